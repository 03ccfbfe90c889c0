//! Which names may name a node, group, job, image, hint or VM.

/// Names the tree uses itself; no object may take them.
pub const RESERVED: &[&str] = &[
    "README",
    "error",
    "new",
    "ctl",
    "queue",
    "status",
    "version",
    "all",
    "up",
    "down",
    "drained",
    "best",
    "volumes",
    "bill",
    "templates",
    "movers",
    "nodes",
    "groups",
    "jobs",
    "images",
    "hsm",
    "vms",
    "tasks",
    "attempts",
    "spec",
    "state",
];

/// Longest accepted object name.
pub const MAX_NAME: usize = 63;

/// Checks an object name: 1-63 characters of `[A-Za-z0-9._-]`, starting with a letter or digit,
/// and not a reserved name. The error is a sentence naming `what`.
pub fn check(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("a {what} name cannot be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!("a {what} name is at most {MAX_NAME} characters (this one has {})", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{what} name {name:?} has the character {c:?}; use letters, digits, '.', '_' and '-'"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("{what} name {name:?} must start with a letter or digit"));
    }
    if RESERVED.contains(&name) {
        return Err(format!("{name:?} is a reserved name and cannot name a {what}"));
    }
    Ok(())
}

/// This host's name as the kernel has it (empty if it cannot be read).
pub fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "a/b", "..", ".", "a b", "-x", &"x".repeat(300), "README", "error", "cn\u{e9}", "a\0b"] {
            assert!(check("node", bad).is_err(), "{bad:?}");
        }
        for good in ["cn1", "cn001", "login-2", "gpu.a_1"] {
            assert!(check("node", good).is_ok(), "{good:?}");
        }
    }
}
