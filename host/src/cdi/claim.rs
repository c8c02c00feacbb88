//! The CDI spec of a prepared DRA claim: one CDI device per request,
//! carrying that request's whole `allocate` answer (DRA has no other way to
//! hand edits to a container), in a file of its own removed at unprepare.

use std::path::{Path, PathBuf};

use super::names::{check_names, claim_kind, claim_spec_path};
use super::spec::{CDI_VERSION, Spec, SpecDevice, all_edits, invalid_edits, write_atomically};
use crate::model::Allocation;

/// Writes the CDI spec of a prepared claim: one device per request, with
/// the edits of that request's `allocate` answer; no file when there is no
/// device (CDI refuses an empty spec). The error says why the claim cannot
/// be prepared.
pub fn write_claim_spec(
    dir: &Path,
    driver: &str,
    claim_uid: &str,
    devices: &[(String, Allocation)],
) -> Result<Option<PathBuf>, String> {
    if devices.is_empty() {
        return Ok(None);
    }
    let kind = claim_kind(driver);
    let mut spec = Spec { cdi_version: CDI_VERSION.into(), kind: kind.clone(), ..Spec::default() };
    for (name, allocation) in devices {
        check_names(&kind, Some(name))?;
        let edits = all_edits(allocation);
        if let Some(why) = invalid_edits(allocation, &edits) {
            return Err(format!("the backend's allocate answer cannot be a CDI device: {why}"));
        }
        spec.devices.push(SpecDevice { name: name.clone(), container_edits: edits, ..SpecDevice::default() });
    }
    let path = claim_spec_path(dir, driver, claim_uid);
    let text = serde_json::to_vec_pretty(&spec).map_err(|error| format!("cannot encode the CDI spec: {error}"))?;
    write_atomically(&path, &text).map_err(|error| format!("cannot write the CDI spec {}: {error}", path.display()))?;
    Ok(Some(path))
}

/// Removes the CDI spec of a claim; one already gone is no error.
pub fn remove_claim_spec(dir: &Path, driver: &str, claim_uid: &str) -> std::io::Result<()> {
    match std::fs::remove_file(claim_spec_path(dir, driver, claim_uid)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}
