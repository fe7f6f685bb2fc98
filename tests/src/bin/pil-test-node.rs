// The same allocator as the pil-node binary, so tests and benchmarks run what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    pil_node::cli::main()
}
