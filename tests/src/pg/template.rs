//! A data directory made by `initdb` once and copied for every cluster.
//!
//! `initdb` takes over a second; copying its result takes a fraction of that. The template lives
//! next to the clusters (`<base>/cutover-pgtpl-<key>`, the key covering the binaries, the user and
//! the `initdb` arguments) so that every test process on the machine shares it: an exclusive lock
//! file makes one process build it, and an atomic rename publishes it complete. It records how
//! many files it holds, so a template damaged by a `/tmp` cleaner is noticed and rebuilt.
//! `CUTOVER_PG_TEMPLATE=0` turns it off (every cluster runs `initdb`).

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, anyhow};

use super::{RunAs, chown, initdb, random_token};

/// Bump when `initdb`'s arguments or the template layout change.
const FORMAT: u32 = 1;
const FILE_COUNT: &str = "file-count";

/// Whether clusters are copied from the shared template (the default).
pub(super) fn enabled() -> bool {
    !matches!(
        std::env::var("CUTOVER_PG_TEMPLATE").as_deref(),
        Ok("0" | "false" | "no" | "off")
    )
}

/// Fills `dest` (which must not exist) with a fresh data directory copied from the template.
pub(super) fn instantiate(
    base: &Path,
    bin_dir: &Path,
    run_as: Option<RunAs>,
    dest: &Path,
) -> Result<()> {
    let mut failure = None;
    for _ in 0..2 {
        let template = get(base, bin_dir, run_as)?;
        let expected: u64 = fs::read_to_string(template.join(FILE_COUNT))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX);
        match copy_tree(&template.join("data"), dest, run_as) {
            Ok(n) if n == expected => return Ok(()),
            Ok(n) => {
                failure = Some(anyhow!(
                    "the template {} holds {n} files instead of {expected}",
                    template.display()
                ));
            }
            Err(e) => {
                failure = Some(e.context(format!(
                    "copying the template {} to {}",
                    template.display(),
                    dest.display()
                )));
            }
        }
        // Damaged (say by a /tmp cleaner): throw it away and build a new one.
        let _ = fs::remove_dir_all(dest);
        discard(&template);
    }
    Err(failure.unwrap_or_else(|| anyhow!("no template")))
}

/// The template's directory (holding `data/` and the file count), built if missing.
fn get(base: &Path, bin_dir: &Path, run_as: Option<RunAs>) -> Result<PathBuf> {
    // One builder per process; the lock file below does the same across processes.
    static BUILDING: Mutex<()> = Mutex::new(());

    let name = format!("cutover-pgtpl-{:016x}", key(bin_dir, run_as)?);
    let root = base.join(&name);
    if complete(&root) {
        return Ok(root);
    }
    let _in_process = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let lock_path = base.join(format!("{name}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if complete(&root) {
        return Ok(root);
    }
    // Leftovers of a build that died half-way.
    let _ = fs::remove_dir_all(&root);
    let tmp = base.join(format!(
        "{name}.tmp-{}-{}",
        std::process::id(),
        random_token(8)
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let built = (|| {
        chown(&tmp, run_as)?;
        initdb(bin_dir, &tmp.join("data"), run_as, &tmp, &random_token(24))?;
        let files = count_files(&tmp.join("data"))?;
        fs::write(tmp.join(FILE_COUNT), format!("{files}\n"))?;
        fs::rename(&tmp, &root)
            .with_context(|| format!("renaming {} to {}", tmp.display(), root.display()))
    })();
    if built.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    built.map(|()| root)
}

fn complete(root: &Path) -> bool {
    root.join(FILE_COUNT).is_file() && root.join("data/PG_VERSION").is_file()
}

fn discard(root: &Path) {
    let aside = root.with_extension(format!("broken-{}-{}", std::process::id(), random_token(8)));
    if fs::rename(root, &aside).is_ok() {
        let _ = fs::remove_dir_all(&aside);
    }
}

fn key(bin_dir: &Path, run_as: Option<RunAs>) -> Result<u64> {
    let postgres = bin_dir.join("postgres");
    let meta =
        fs::metadata(&postgres).with_context(|| format!("inspecting {}", postgres.display()))?;
    let mut h = DefaultHasher::new();
    FORMAT.hash(&mut h);
    bin_dir.hash(&mut h);
    meta.len().hash(&mut h);
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .hash(&mut h);
    super::sys::euid().hash(&mut h);
    run_as.map(|r| (r.uid, r.gid)).hash(&mut h);
    Ok(h.finish())
}

fn count_files(dir: &Path) -> io::Result<u64> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            n += count_files(&entry.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

/// Copies a directory tree, keeping modes and giving everything to `run_as`. Returns the number
/// of non-directory entries copied.
fn copy_tree(src: &Path, dst: &Path, run_as: Option<RunAs>) -> Result<u64> {
    let mode = fs::symlink_metadata(src)?.mode() & 0o7777;
    fs::DirBuilder::new().mode(mode).create(dst)?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    chown(dst, run_as)?;
    let mut n = 0;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let to = dst.join(entry.file_name());
        if kind.is_dir() {
            n += copy_tree(&entry.path(), &to, run_as)?;
            continue;
        }
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &to)?;
            if let Some(r) = run_as {
                std::os::unix::fs::lchown(&to, Some(r.uid), Some(r.gid))?;
            }
        } else {
            fs::copy(entry.path(), &to)?;
            chown(&to, run_as)?;
        }
        n += 1;
    }
    Ok(n)
}
