//! `cargo run --example check -- DIR`: what `pil policy check DIR` prints.
fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "legal-config".into());
    match pil_legal::check(&dir) {
        Ok(summary) => print!("{summary}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
