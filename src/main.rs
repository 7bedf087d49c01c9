//! The `segmentd` binary: everything is in the library; see `segmentd --help`.

/// mimalloc: the per-event path allocates many small, short-lived strings, and the benches
/// (`benches/engine.rs` uses it too) measure it faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    segmentd::cli::main()
}
