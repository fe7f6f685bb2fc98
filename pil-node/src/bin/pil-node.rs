// glibc's allocator spent about a fifth of a loaded node's CPU (malloc_consolidate
// and friends, across the tokio and RocksDB threads); mimalloc spends a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pil_node::cli::main()
}
