//! `kekd`: supervisor, PKCS#11 tenant workers and the command line. Never calls the TPM
//! backend, so libtss2 is not among its libraries (see the library's doc).

fn main() -> std::process::ExitCode {
    kekd::main()
}
