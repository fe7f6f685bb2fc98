fn main() -> anyhow::Result<()> {
    pil_node::cli::main()
}
