//! What both binaries do at their edge: an error that ends them is one line, never a backtrace.

use std::process::ExitCode;

/// Runs `run`; an error is printed as `<program>: <error>: <cause>...` and exits with status 1,
/// whatever `RUST_BACKTRACE` says (these are an admin's mistakes, not panics).
pub fn exit_with(program: &str, run: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes after colons, each cause left out when the message before it
/// already says it (an error type that prints its source).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(crate::config::ConfigError::Read { path: "/x".into(), source: io });
        assert_eq!(one_line(&e), "config /x: No such file");
        let e = anyhow::anyhow!("low").context("high");
        assert_eq!(one_line(&e), "high: low");
    }
}
