//! Rebuild when the bpf-linker binary changes (it is an undeclared build tool).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
