//! How the CLI prints an error: the message and its causes, each once.

/// Formats an error and its causes like anyhow's `{:#}` ("a: b: c"), but leaves out a cause
/// whose text the message already contains: the library errors print their source (e.g.
/// `path: No such file or directory`) and also return it as `source()`, which would otherwise
/// repeat the OS error.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.is_empty() {
            msg = text;
        } else if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_does_not_repeat_a_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        #[derive(Debug)]
        struct Wrapped(std::io::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "x.json: {}", self.0)
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Wrapped(io)).context("reading the manifest");
        assert_eq!(
            error_chain(&e),
            "reading the manifest: x.json: No such file or directory"
        );
        assert_eq!(
            format!("{e:#}"),
            "reading the manifest: x.json: No such file or directory: No such file or directory"
        );
    }
}
