//! The `segmentd` binary: everything is in the library; see `segmentd --help`.

fn main() -> std::process::ExitCode {
    segmentd::cli::main()
}
