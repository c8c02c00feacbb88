//! A small path glob: `*`, `?` and `[...]` (with `!` or `^` negation and
//! `a-z` ranges) inside one path component; no `**`. Matching walks the
//! directory tree component by component, so `/dev/snd/*` reads only
//! `/dev/snd`. It owns pattern matching and expansion, not what a match
//! means.

use std::path::{Path, PathBuf};

/// Whether `name` (one path component) matches `pattern` (one component).
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    match_from(&p, &n)
}

fn match_from(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|skip| match_from(&p[1..], &n[skip..])),
        Some('?') => !n.is_empty() && match_from(&p[1..], &n[1..]),
        Some('[') => match (class(&p[1..]), n.first()) {
            (Some((accepts, rest)), Some(c)) => accepts(*c) && match_from(rest, &n[1..]),
            (None, Some(c)) => *c == '[' && match_from(&p[1..], &n[1..]),
            (_, None) => false,
        },
        Some(c) => n.first() == Some(c) && match_from(&p[1..], &n[1..]),
    }
}

/// Parses a `[...]` class (after the `[`): a predicate and the rest of the
/// pattern, or `None` when the class is not closed (then `[` is literal).
#[expect(clippy::type_complexity, reason = "a local parser result")]
fn class(p: &[char]) -> Option<(Box<dyn Fn(char) -> bool + '_>, &[char])> {
    let negated = matches!(p.first(), Some('!' | '^'));
    let body = if negated { &p[1..] } else { p };
    // A `]` right after the opening is a member, not the end.
    let end = body.iter().skip(1).position(|c| *c == ']').map(|i| i + 1)?;
    let members = &body[..end];
    let accepts = move |c: char| {
        let mut i = 0;
        let mut found = false;
        while i < members.len() {
            if i + 2 < members.len() && members[i + 1] == '-' {
                found |= members[i] <= c && c <= members[i + 2];
                i += 3;
            } else {
                found |= members[i] == c;
                i += 1;
            }
        }
        found != negated
    };
    Some((Box::new(accepts), &body[end + 1..]))
}

fn has_magic(component: &str) -> bool {
    component.contains(['*', '?', '['])
}

/// Every existing path matching the absolute `pattern`, with `root`
/// prepended on disk (`/` in production, a temp dir in tests). Returns the
/// matches as pattern-side paths (without `root`), sorted. Unreadable
/// directories match nothing.
pub fn expand(root: &Path, pattern: &str) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/")];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for dir in &found {
            let on_disk = on_disk(root, dir);
            if !has_magic(component) {
                let candidate = dir.join(component);
                if std::fs::symlink_metadata(on_disk.join(component)).is_ok() {
                    next.push(candidate);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&on_disk) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                // Like a shell: `*` does not match hidden names.
                if name.starts_with('.') && !component.starts_with('.') {
                    continue;
                }
                if matches(component, name) {
                    next.push(dir.join(name));
                }
            }
        }
        found = next;
    }
    found.sort();
    found.dedup();
    found.retain(|p| p != Path::new("/"));
    found
}

/// Where the pattern-side absolute `path` lives on disk under `root`.
pub fn on_disk(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_match_like_a_shell() {
        assert!(matches("ttyUSB*", "ttyUSB0"));
        assert!(matches("ttyUSB*", "ttyUSB"));
        assert!(!matches("ttyUSB*", "ttyACM0"));
        assert!(matches("pcmC?D0p", "pcmC1D0p"));
        assert!(matches("tty[0-9]", "tty7"));
        assert!(!matches("tty[!0-9]", "tty7"));
        assert!(matches("tty[^0-9]", "ttyS"));
        assert!(matches("a[]]b", "a]b"));
        assert!(matches("a[b", "a[b"));
        assert!(matches("fuse", "fuse"));
        assert!(!matches("fuse", "fuses"));
        assert!(matches("*D*c", "controlC0Dxc"));
    }

    #[test]
    fn expansion_walks_only_the_matching_directories() {
        let root = tempfile::tempdir().expect("tempdir");
        for path in ["dev/ttyUSB0", "dev/ttyUSB1", "dev/ttyS0", "dev/snd/pcmC0D0p", "dev/snd/controlC0", "dev/.hidden"]
        {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, "").expect("write");
        }
        let got = |pattern| expand(root.path(), pattern);
        assert_eq!(got("/dev/ttyUSB*"), [PathBuf::from("/dev/ttyUSB0"), PathBuf::from("/dev/ttyUSB1")]);
        assert_eq!(got("/dev/snd/*").len(), 2);
        assert_eq!(got("/dev/*/pcm*"), [PathBuf::from("/dev/snd/pcmC0D0p")]);
        assert_eq!(got("/dev/ttyS0"), [PathBuf::from("/dev/ttyS0")]);
        assert!(got("/dev/missing").is_empty());
        assert!(got("/nothing/*").is_empty());
        assert!(!got("/dev/*").iter().any(|p| p.ends_with(".hidden")));
    }
}
