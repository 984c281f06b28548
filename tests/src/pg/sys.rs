//! The few operating-system calls the test bed needs that `std` does not offer.
//!
//! The workspace denies `unsafe_code`; each function here allows it for one call and says why
//! the call is sound.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Whether the test process runs with effective user id 0.
pub(crate) fn is_root() -> bool {
    euid() == 0
}

/// The effective user id of the test process.
#[allow(unsafe_code)]
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Looks a user up in the password database (`/etc/passwd`, NSS): `(uid, gid)`.
#[allow(unsafe_code)]
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname = CString::new(name).map_err(io::Error::other)?;
    let mut buf_len = 16 * 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; buf_len];
        // SAFETY: an all-zero `passwd` is a valid value of this plain C struct (null pointers and
        // zero ids); getpwnam_r overwrites it before we read it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call: `cname` is a
        // NUL-terminated string, `pwd` and `found` are live locals and `buf` is `buf.len()` bytes
        // long. getpwnam_r (unlike getpwnam) uses no static storage, so it is thread-safe.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf_len < 1024 * 1024 {
            buf_len *= 4;
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // The string fields of `pwd` point into `buf`, but we only copy out the two integers.
        return Ok((!found.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// Sends `signal` to process `pid`.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill only takes integers; a stale pid yields ESRCH, reported as an error.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the child started by `cmd` receive `signal` when the thread that spawns it dies
/// (`PR_SET_PDEATHSIG`), which includes the whole test process being killed.
///
/// Linux ties the parent-death signal to the spawning *thread*, so spawn such commands from a
/// thread that lives as long as the process (see `spawner` in the parent module). The kernel
/// clears the setting when the credentials change; std runs `pre_exec` hooks after
/// `setuid`/`setgid`, so it survives [`CommandExt::uid`].
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // std::process::id() is the thread-group id, which is what getppid() reports in the child.
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    let signal = libc::c_ulong::try_from(signal).unwrap_or(libc::SIGKILL as libc::c_ulong);
    // SAFETY: the hook runs in the forked child before exec. It only calls prctl and getppid,
    // which are async-signal-safe, and builds errors from raw OS codes, which does not allocate;
    // it touches no lock or memory shared with the parent's other threads.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then no signal would come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Bytes available to unprivileged users on the file system holding `path`.
#[allow(unsafe_code)]
pub(crate) fn available_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct of integers.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `cpath` is NUL-terminated and `st` is a live, writable local.
    if unsafe { libc::statvfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
