//! How both binaries tell a person what went wrong: one line, each cause said once.

/// `error` and its causes as one line. A cause whose text the line already contains
/// (many messages include their source) is left out, and line breaks (e.g. in a
/// parser's message) become spaces.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = e.source();
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the data directory: {0}")]
    struct Outer(#[from] std::io::Error);

    #[test]
    fn causes_are_said_once_on_one_line() {
        let e = Outer(std::io::Error::other("disk\nfull"));
        assert_eq!(one_line(&e), "cannot open the data directory: disk full");
    }
}
