use std::process::ExitCode;

fn main() -> ExitCode {
    sd_host::cli::main()
}
