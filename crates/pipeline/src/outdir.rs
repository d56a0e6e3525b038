//! Output directories and output sets, shared by every command that writes files.
//!
//! - **One writer per output directory.** [`OutLock::acquire`] takes an exclusive advisory lock
//!   (`flock`, std's `File::try_lock`) on `DIR/.moe-xray.lock` for the lifetime of the command. A
//!   second moe-xray process writing the same directory fails at once with a message naming the
//!   directory. The lock file is removed when the command ends; after a `kill -9` it stays, but
//!   the operating system has released the lock, so it does not block the next command.
//!   `synth-model`, which replaces its directory as a whole, locks `PARENT/.NAME.moe-xray.lock`
//!   instead ([`OutLock::acquire_beside`]).
//! - **Outputs appear all together or not at all.** A [`Batch`] first writes every file of a
//!   command's output set in full to a hidden temporary file beside its destination
//!   (`.moe-xray-tmp-*`, fsynced); only when all of them are written are they renamed into place,
//!   in the order they were added, so the completeness marker (`results.json`, `report.html`)
//!   added last appears last. On an error, or when the batch is dropped uncommitted, the temporary
//!   files are removed, and so are the directories the batch created if they are left empty.
//!   A directory that a failed command created and left empty is removed when the [`OutLock`]
//!   is dropped, so a command that fails early leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{invalid, IoContext, PipelineError, Result};

/// Name of the lock file inside a locked output directory.
pub const LOCK_FILE: &str = ".moe-xray.lock";
/// Prefix of the temporary files (shared with `moe_xray_trace::write_atomic`).
const TMP_PREFIX: &str = ".moe-xray-tmp-";
/// Prefix of temporary staging directories (e.g. the report rendered before it is moved in).
pub const STAGING_PREFIX: &str = ".moe-xray-staging-";

/// `dir`, or `.` for an empty path (the parent of a bare file name).
fn non_empty(dir: &Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_path_buf()
    }
}

fn parent_of(path: &Path) -> PathBuf {
    non_empty(path.parent().unwrap_or(Path::new("")))
}

/// Creates `dir` and its missing ancestors; returns the directories this call created, outermost
/// first (a directory another process creates at the same moment is not counted).
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || std::fs::symlink_metadata(d).is_ok() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        match std::fs::create_dir(&d) {
            Ok(()) => created.push(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => {
                remove_empty_dirs(&created);
                return Err(PipelineError::io(
                    format!("cannot create directory {}", d.display()),
                    e,
                ));
            }
        }
    }
    if !dir.is_dir() {
        remove_empty_dirs(&created);
        invalid!("{}: exists and is not a directory", dir.display());
    }
    Ok(created)
}

/// Removes the directories of `dirs` (outermost first) that are empty, innermost first.
fn remove_empty_dirs(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        // remove_dir fails (and leaves the directory) unless it is empty
        let _ = std::fs::remove_dir(d);
    }
}

/// Best-effort fsync of a directory, so that renames into it are durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// An exclusive lock on an output directory, held until dropped (see the module docs).
pub struct OutLock {
    lock_path: PathBuf,
    /// Directories created by `acquire`, outermost first.
    created: Vec<PathBuf>,
    /// Whether we hold the lock (only then is the lock file ours to remove).
    locked: bool,
    _file: File,
}

impl OutLock {
    /// Creates `dir` if needed and locks `dir/.moe-xray.lock`; fails at once when another process
    /// holds it. Leftover temporary files of an earlier, killed command in `dir` and its immediate
    /// subdirectories are removed (nobody else can be writing them while we hold the lock).
    pub fn acquire(dir: &Path) -> Result<OutLock> {
        let created = create_dirs(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = Self::lock(dir, &lock_path, created)?;
        remove_stale_temps(dir, 1);
        Ok(lock)
    }

    /// Locks `PARENT/.NAME.moe-xray.lock` for an output directory that is replaced as a whole
    /// (written to a temporary sibling and renamed into place), creating PARENT if needed.
    pub fn acquire_beside(dir: &Path) -> Result<OutLock> {
        let name = dir
            .file_name()
            .ok_or_else(|| {
                PipelineError::Invalid(format!("{}: not a usable directory name", dir.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = parent_of(dir);
        let created = create_dirs(&parent)?;
        let lock_path = parent.join(format!(".{name}.moe-xray.lock"));
        Self::lock(dir, &lock_path, created)
    }

    fn lock(dir: &Path, lock_path: &Path, created: Vec<PathBuf>) -> Result<OutLock> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path)
        {
            Ok(f) => f,
            Err(e) => {
                remove_empty_dirs(&created);
                return Err(PipelineError::io(
                    format!("cannot create the lock file {}", lock_path.display()),
                    e,
                ));
            }
        };
        // From here on, dropping `guard` removes what `created` lists (when left empty).
        let mut guard = OutLock {
            lock_path: lock_path.to_path_buf(),
            created,
            locked: false,
            _file: file,
        };
        match guard._file.try_lock() {
            Ok(()) => guard.locked = true,
            Err(std::fs::TryLockError::WouldBlock) => {
                // the directory is the other writer's now, whoever created it
                guard.created.clear();
                invalid!(
                "{}: another moe-xray process is writing to this directory (it holds the lock {}); \
                 wait for it to finish or choose another output directory",
                dir.display(),
                lock_path.display()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(PipelineError::io(
                    format!("cannot lock {}", lock_path.display()),
                    e,
                ))
            }
        }
        // The lock file must still be the one we locked (a failing command removes the lock file
        // of a directory it created; a process that opened it just before would hold a lock on a
        // deleted file).
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let ours = guard._file.metadata().ok().map(|m| (m.dev(), m.ino()));
            let now = std::fs::metadata(lock_path)
                .ok()
                .map(|m| (m.dev(), m.ino()));
            if ours.is_none() || ours != now {
                guard.locked = false;
                guard.created.clear();
                invalid!(
                    "{}: another moe-xray process is writing to this directory (its lock {} changed while we were taking it); \
                     wait for it to finish or choose another output directory",
                    dir.display(),
                    lock_path.display()
                );
            }
        }
        Ok(guard)
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        if self.locked {
            // Removed while still held: a process that opened the file just before finds, once
            // it gets the lock, that the path no longer names it, and gives up (see `lock`).
            let _ = std::fs::remove_file(&self.lock_path);
        }
        // Directories this command created and left empty: it produced no output there.
        remove_empty_dirs(&self.created);
    }
}

/// Removes `.moe-xray-tmp-*` files and `.moe-xray-staging-*` directories in `dir` and, down to
/// `depth` more levels, in its subdirectories that have no lock file of their own. Only called
/// while holding `dir`'s lock.
fn remove_stale_temps(dir: &Path, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_file() && name.starts_with(TMP_PREFIX) {
            let _ = std::fs::remove_file(e.path());
        } else if ft.is_dir() && name.starts_with(STAGING_PREFIX) {
            let _ = std::fs::remove_dir_all(e.path());
        } else if ft.is_dir() && depth > 0 && !e.path().join(LOCK_FILE).exists() {
            // (a subdirectory with its own lock, e.g. a run's `traces/`, is another command's)
            remove_stale_temps(&e.path(), depth - 1);
        }
    }
}

enum Step {
    /// A complete temporary file and its destination.
    Put { tmp: PathBuf, dest: PathBuf },
    /// An old output that is not part of the new set (removed before the files after it appear).
    Remove(PathBuf),
}

/// One command's output set, written in full to temporary files and then renamed into place
/// together (see the module docs).
#[derive(Default)]
pub struct Batch {
    steps: Vec<Step>,
    /// Directories created for destinations, outermost first per call.
    created: Vec<PathBuf>,
    committed: bool,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Writes `bytes` to a temporary file beside `dest` (created with missing parent directories).
    pub fn add(&mut self, dest: impl Into<PathBuf>, bytes: impl AsRef<[u8]>) -> Result<()> {
        let bytes = bytes.as_ref();
        self.add_with(dest, |w| w.write_all(bytes))
    }

    /// Like [`Batch::add`], the content written by `fill` (tests inject failures through it).
    pub fn add_with(
        &mut self,
        dest: impl Into<PathBuf>,
        fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        let dest = dest.into();
        let dir = parent_of(&dest);
        let created = create_dirs(&dir)?;
        self.created.extend(created);
        let ctx = || format!("writing {}", dest.display());
        let (file, tmp) = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&dir)
            .io_context(ctx)?
            .keep()
            .map_err(|e| e.error)
            .io_context(ctx)?;
        self.steps.push(Step::Put {
            tmp,
            dest: dest.clone(),
        });
        {
            let mut w = std::io::BufWriter::new(&file);
            fill(&mut w).io_context(ctx)?;
            w.flush().io_context(ctx)?;
        }
        // Ordinary output files (tempfile creates 0600 ones).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o644))
                .io_context(ctx)?;
        }
        file.sync_all().io_context(ctx)?;
        Ok(())
    }

    /// Adds a copy of the file `src` as `dest`.
    pub fn add_file(&mut self, dest: impl Into<PathBuf>, src: &Path) -> Result<()> {
        let bytes = std::fs::read(src).io_context(|| format!("cannot read {}", src.display()))?;
        self.add(dest, bytes)
    }

    /// Removes `dest` (when it exists) at this point of the commit: an output of an earlier run
    /// that the new set does not contain.
    pub fn remove(&mut self, dest: impl Into<PathBuf>) {
        self.steps.push(Step::Remove(dest.into()));
    }

    /// Renames every file into place, in the order added.
    pub fn commit(mut self) -> Result<()> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for step in &self.steps {
            match step {
                Step::Put { tmp, dest } => {
                    std::fs::rename(tmp, dest)
                        .io_context(|| format!("cannot move {} into place", dest.display()))?;
                    let d = parent_of(dest);
                    if !dirs.contains(&d) {
                        dirs.push(d);
                    }
                }
                Step::Remove(dest) => match std::fs::remove_file(dest) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(PipelineError::io(
                            format!("cannot remove the stale output {}", dest.display()),
                            e,
                        ))
                    }
                },
            }
        }
        for d in &dirs {
            sync_dir(d);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for step in &self.steps {
            if let Step::Put { tmp, .. } = step {
                // Already renamed (a commit that failed half-way) or never created: NotFound.
                let _ = std::fs::remove_file(tmp);
            }
        }
        remove_empty_dirs(&self.created);
    }
}

/// The largest `--threads` value accepted (documented in the README).
pub const MAX_THREADS: usize = 1024;

/// Checks a `--threads` value: 1 ..= [`MAX_THREADS`].
pub fn check_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 || t > MAX_THREADS {
            invalid!("--threads {t}: must be between 1 and {MAX_THREADS}");
        }
    }
    Ok(())
}

/// Checks the `RAYON_NUM_THREADS` environment variable (rayon's global pool size, which every
/// command uses): a number above [`MAX_THREADS`] would make rayon fail to start its threads.
/// Unset, empty, `0` and non-numbers mean "all cores" to rayon and are accepted.
pub fn check_rayon_env() -> Result<()> {
    if let Ok(v) = std::env::var("RAYON_NUM_THREADS") {
        if let Ok(n) = v.trim().parse::<u128>() {
            if n > MAX_THREADS as u128 {
                invalid!("RAYON_NUM_THREADS={v}: must be between 1 and {MAX_THREADS} (or 0 for all cores)");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error and its causes, ": "-separated, each cause once (as the CLI prints them).
    fn error_chain(e: &PipelineError) -> String {
        let mut msg = e.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(c) = cur {
            let text = c.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            cur = c.source();
        }
        msg
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn batch_commits_all_files_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old.csv"), "stale").unwrap();
        let mut b = Batch::new();
        b.add(out.join("a.csv"), "a").unwrap();
        b.add(out.join("sub/b.svg"), "b").unwrap();
        b.remove(out.join("old.csv"));
        b.add(out.join("results.json"), "{}").unwrap();
        // nothing visible before the commit
        assert!(!out.join("results.json").exists() && !out.join("a.csv").exists());
        b.commit().unwrap();
        assert_eq!(names(&out), ["a.csv", "results.json", "sub"]);
        assert_eq!(std::fs::read_to_string(out.join("sub/b.svg")).unwrap(), "b");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(out.join("a.csv"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o644);
        }
    }

    #[test]
    fn injected_write_failure_leaves_no_partial_set() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("results.json"), "old").unwrap();
        let mut b = Batch::new();
        b.add(out.join("signatures.csv"), "x,y\n").unwrap();
        b.add(out.join("figures/one.svg"), "<svg/>").unwrap();
        let err = b
            .add_with(out.join("prompt_similarity.csv"), |w| {
                w.write_all(b"half")?;
                Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device",
                ))
            })
            .unwrap_err();
        let msg = error_chain(&err);
        assert_eq!(
            msg,
            format!(
                "writing {}: No space left on device",
                out.join("prompt_similarity.csv").display()
            )
        );
        drop(b);
        // the old output untouched, no new file, no temporary file, no created directory
        assert_eq!(names(&out), ["results.json"]);
        assert_eq!(
            std::fs::read_to_string(out.join("results.json")).unwrap(),
            "old"
        );
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("a/b");
        let first = OutLock::acquire(&out).unwrap();
        let msg = error_chain(&OutLock::acquire(&out).err().unwrap());
        assert!(
            msg.contains(&out.display().to_string()) && msg.contains("another moe-xray process"),
            "{msg}"
        );
        drop(first);
        // the directories it created held nothing but the lock: all removed
        assert!(!tmp.path().join("a").exists());
        let again = OutLock::acquire(&out).unwrap();
        std::fs::write(out.join("x"), "output").unwrap();
        assert_eq!(names(&out), [LOCK_FILE, "x"]);
        drop(again);
        // the lock file lives as long as the lock
        assert_eq!(names(&out), ["x"]);
    }

    #[test]
    fn stale_temporaries_are_removed_under_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        std::fs::write(out.join(".moe-xray-tmp-abc"), "x").unwrap();
        std::fs::create_dir_all(out.join("figures")).unwrap();
        std::fs::write(out.join("figures/.moe-xray-tmp-def"), "x").unwrap();
        std::fs::create_dir_all(out.join(".moe-xray-staging-1/figures")).unwrap();
        std::fs::write(out.join("keep.csv"), "x").unwrap();
        // a subdirectory locked by another command keeps its temporary files
        std::fs::create_dir_all(out.join("traces")).unwrap();
        std::fs::write(out.join("traces").join(LOCK_FILE), "").unwrap();
        std::fs::write(out.join("traces/.moe-xray-tmp-ghi"), "x").unwrap();
        let _l = OutLock::acquire(out).unwrap();
        assert_eq!(names(&out.join("traces")), [".moe-xray-tmp-ghi", LOCK_FILE]);
        assert_eq!(names(out), [LOCK_FILE, "figures", "keep.csv", "traces"]);
        assert_eq!(names(&out.join("figures")), Vec::<String>::new());
    }

    #[test]
    fn a_file_is_not_an_output_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, "x").unwrap();
        let msg = error_chain(&OutLock::acquire(&f).err().unwrap());
        assert!(msg.contains("not a directory"), "{msg}");
        let msg = error_chain(&OutLock::acquire(&f.join("sub")).err().unwrap());
        assert!(msg.contains("cannot create directory"), "{msg}");
    }

    #[test]
    fn thread_counts_are_bounded() {
        assert!(check_threads(None).is_ok());
        assert!(check_threads(Some(1)).is_ok());
        assert!(check_threads(Some(MAX_THREADS)).is_ok());
        for bad in [0, MAX_THREADS + 1, 100_000, usize::MAX] {
            let msg = check_threads(Some(bad)).unwrap_err().to_string();
            assert!(msg.contains("--threads") && msg.contains("1024"), "{msg}");
        }
    }
}
