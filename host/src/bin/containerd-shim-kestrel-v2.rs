//! The containerd shim v2 for runtime `io.containerd.kestrel.v2`.

fn main() -> std::process::ExitCode {
    kestrel_host::shim::main()
}
