//! The `devhost` command. Everything lives in the library; this stays thin.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    devhost::cli::main()
}
