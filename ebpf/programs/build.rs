//! The object depends on the bpf-linker binary, which cargo cannot see: rebuild when it changes.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!(
            "bpf-linker not found in PATH: run scripts/install-deps.sh and `source scripts/env.sh` \
             (see docs/development.md)"
        ),
    }
}
