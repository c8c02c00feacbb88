//! Configuration errors, each naming the file and, where the problem has a
//! place in it, the line and column (1-based) where it starts.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A problem with one configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Line and column (1-based) of the offending value, when known.
    pub location: Option<(usize, usize)>,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl ConfigError {
    /// An error about the whole file (unreadable, missing).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError { file: file.to_owned(), location: None, message: message.into() }
    }

    /// An error at a byte span of `source`.
    pub fn at(file: &Path, source: &str, span: Range<usize>, message: impl Into<String>) -> Self {
        ConfigError { file: file.to_owned(), location: Some(line_column(source, span.start)), message: message.into() }
    }

    /// A TOML syntax or schema error (unknown key, wrong type).
    pub fn from_toml(file: &Path, source: &str, error: &toml::de::Error) -> Self {
        let message = error.message().trim_end().to_owned();
        match error.span() {
            Some(span) => ConfigError::at(file, source, span, message),
            None => ConfigError::file(file, message),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |tail| tail.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let source = "a = 1\nbb = 2\n";
        assert_eq!(line_column(source, 0), (1, 1));
        assert_eq!(line_column(source, 6), (2, 1));
        assert_eq!(line_column(source, 11), (2, 6));
    }

    #[test]
    fn display_names_file_line_and_column() {
        let error = ConfigError::at(Path::new("/etc/x.toml"), "k = 1\nv = 2", 6..7, "bad");
        assert_eq!(error.to_string(), "/etc/x.toml:2:1: bad");
    }
}
