//! `devhost new-backend NAME --lang rust|c`: writes a minimal backend
//! project outside devhost's tree that builds as it is and passes
//! `devhost check`: the code, its build file, a `backends.d` file and a
//! README. A Rust project gets a copy of the SDK (`devhost-abi`, which
//! stands alone), a C project a copy of the header, so neither needs a
//! devhost checkout.

use std::path::{Path, PathBuf};

/// The language of the project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate on devhost's SDK: a native module, or a WASM component.
    Rust,
    /// A C file and a Makefile: a native module.
    C,
}

/// The SDK's files, as this devhost was built with them.
const SDK: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../../abi/Cargo.toml")),
    ("README.md", include_str!("../../../abi/README.md")),
    ("src/lib.rs", include_str!("../../../abi/src/lib.rs")),
    ("src/device_info.rs", include_str!("../../../abi/src/device_info.rs")),
    ("src/ffi.rs", include_str!("../../../abi/src/ffi.rs")),
    ("src/model.rs", include_str!("../../../abi/src/model.rs")),
    ("src/partitions.rs", include_str!("../../../abi/src/partitions.rs")),
    ("src/quantity.rs", include_str!("../../../abi/src/quantity.rs")),
    ("src/sdk/mod.rs", include_str!("../../../abi/src/sdk/mod.rs")),
    ("src/sdk/shim.rs", include_str!("../../../abi/src/sdk/shim.rs")),
    ("src/sdk/testing.rs", include_str!("../../../abi/src/sdk/testing.rs")),
    ("src/sdk/wasm.rs", include_str!("../../../abi/src/sdk/wasm.rs")),
    ("include/devhost_backend.h", include_str!("../../../abi/include/devhost_backend.h")),
    ("wit/devhost-backend-1.0.0/backend.wit", include_str!("../../../abi/wit/devhost-backend-1.0.0/backend.wit")),
    ("wit/devhost-backend-1.1.0/backend.wit", include_str!("../../../abi/wit/devhost-backend-1.1.0/backend.wit")),
    ("wit/devhost-backend-1.2.0/backend.wit", include_str!("../../../abi/wit/devhost-backend-1.2.0/backend.wit")),
];

/// Writes the project into `dir/NAME` (which must not exist yet) and
/// returns its path.
pub fn write(name: &str, lang: Lang, dir: &Path) -> Result<PathBuf, String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return Err(format!(
            "{name:?}: a name is lower-case letters, digits and '-' (it names the crate and the module)"
        ));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(format!("{} exists already; choose another name or directory", root.display()));
    }
    let fill = |template: &str| {
        template
            .replace("@NAME@", name)
            .replace("@RESOURCE@", &format!("{name}.example.com/device"))
            .replace("@ENV@", &format!("{}_DEVICES", name.to_uppercase().replace('-', "_")))
            .replace("@TYPE@", &type_name(name))
    };
    let write = |path: &str, text: &str| -> Result<(), String> {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    let absolute = std::path::absolute(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let (module, build) = match lang {
        Lang::Rust => {
            write("Cargo.toml", &fill(include_str!("new_backend/Cargo.toml.txt")))?;
            write("src/lib.rs", &fill(include_str!("new_backend/lib.rs.txt")))?;
            for (path, text) in SDK {
                write(&format!("devhost-abi/{path}"), text)?;
            }
            let module = absolute.join(format!("target/release/lib{}.so", name.replace('-', "_")));
            let build = "Build the native module, or the same code as a WASM component:\n\n```sh\n\
                         cargo build --release\n\
                         cargo build --release --target wasm32-wasip2   # then name the .wasm in the backends.d file\n```";
            (module, build)
        }
        Lang::C => {
            write(&format!("{name}.c"), &fill(include_str!("new_backend/backend.c.txt")))?;
            write("Makefile", &fill(include_str!("new_backend/Makefile.txt")))?;
            write("devhost_backend.h", include_str!("../../../abi/include/devhost_backend.h"))?;
            (absolute.join(format!("lib{name}.so")), "Build the module:\n\n```sh\nmake\n```")
        }
    };
    write(
        &format!("backends.d/{name}.toml"),
        &format!(
            "# The backends.d file for {name}. On a node, `module` names where the\n\
             # module is installed (root-owned, not writable by others).\n\
             [backend]\nmodule = {:?}\ncall_timeout_ms = 5000\n\n[config]\n",
            module.display().to_string()
        ),
    )?;
    write("README.md", &fill(include_str!("new_backend/README.md.txt")).replace("@BUILD@", build))?;
    Ok(root)
}

/// `acme-gpu` → `AcmeGpu`.
fn type_name(name: &str) -> String {
    let name: String = name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) { format!("Backend{name}") } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the SDK crate is built from is in the copy (a file added
    /// to `abi/` and forgotten here breaks every new project).
    #[test]
    fn the_copy_holds_every_file_of_the_sdk() {
        let abi = Path::new(env!("CARGO_MANIFEST_DIR")).join("abi");
        let mut files = Vec::new();
        let mut dirs = vec![abi.join("src"), abi.join("wit"), abi.join("include")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read the SDK").map(|e| e.expect("entry").path()) {
                if entry.is_dir() {
                    dirs.push(entry);
                } else {
                    files.push(entry.strip_prefix(&abi).expect("inside abi").display().to_string());
                }
            }
        }
        let copied: Vec<&str> = SDK.iter().map(|(path, _)| *path).collect();
        let missing: Vec<&String> = files.iter().filter(|f| !copied.contains(&f.as_str())).collect();
        assert!(missing.is_empty(), "SDK files missing from new-backend's copy: {missing:?}");
    }

    #[test]
    fn names_become_types_and_bad_names_are_refused() {
        assert_eq!(type_name("acme-gpu"), "AcmeGpu");
        assert_eq!(type_name("9lives"), "Backend9lives");
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(write("Acme", Lang::C, dir.path()).is_err_and(|e| e.contains("lower-case")));
        assert!(write("", Lang::Rust, dir.path()).is_err());
        write("acme", Lang::C, dir.path()).expect("written");
        assert!(write("acme", Lang::C, dir.path()).is_err_and(|e| e.contains("exists already")));
    }
}
