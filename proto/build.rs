//! Compiles the .proto files with protox (pure Rust), so building needs no system protoc.

fn main() {
    let protos = ["proto/kekd/v1/kekd.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("compile kekd protobuf definitions");
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(fds)
        .expect("generate Rust code from kekd protobuf definitions");
}
