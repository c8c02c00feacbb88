//! Processes as `/proc` shows them, for the tests that check who runs
//! what (workers, their namespace inits, what is left after devhost).

/// A process as `/proc/<pid>/stat` and `cmdline` show it.
#[derive(Debug, Clone)]
pub(crate) struct Process {
    pub(crate) pid: i32,
    pub(crate) state: char,
    pub(crate) ppid: i32,
    pub(crate) pgrp: i32,
    pub(crate) session: i32,
    pub(crate) args: Vec<String>,
}

/// Process `pid`, if it exists.
pub(crate) fn process(pid: i32) -> Option<Process> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after it.
    let mut fields = stat[stat.rfind(')')? + 2..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let mut number = || fields.next()?.parse().ok();
    let (ppid, pgrp, session) = (number()?, number()?, number()?);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args = cmdline
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    Some(Process { pid, state, ppid, pgrp, session, args })
}

/// Every process.
pub(crate) fn all_processes() -> Vec<Process> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str()?.parse().ok()).filter_map(process).collect()
}

/// The children of `parent`.
pub(crate) fn children(parent: i32) -> Vec<Process> {
    all_processes().into_iter().filter(|p| p.ppid == parent).collect()
}
