// The same allocator as the pil-node binary, so tests and benchmarks run what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pil_node::cli::main()
}
