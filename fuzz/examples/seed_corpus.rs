//! Writes the seed corpus (`kekd_fuzz::seeds`) to `fuzz/corpus/<target>/`, replacing the
//! files there: `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let seeds = kekd_fuzz::seeds::all();
    for target in ["frame", "request", "edek", "connection"] {
        let dir = root.join(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
    }
    for (target, name, bytes) in &seeds {
        std::fs::write(root.join(target).join(name), bytes)?;
    }
    println!("{} seeds written under {}", seeds.len(), root.display());
    Ok(())
}
