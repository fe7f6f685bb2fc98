fn main() -> std::process::ExitCode {
    pil_client::cli::main()
}
