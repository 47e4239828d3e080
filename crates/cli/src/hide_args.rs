//! Keeps a password given on the command line (`-p`, `--password`) out of the process list.
//!
//! `/proc/PID/cmdline`, which `ps` shows to every user, is read from the process's own argument
//! memory. glibc hands `argc`/`argv` to every function in `.init_array`; we keep the pointer and,
//! once the arguments are parsed (clap holds its own copies), overwrite the password's bytes with
//! NULs in place, as curl does. The password is visible only between `exec` and that moment.

use std::ffi::{CStr, OsString, c_char, c_int};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicIsize, AtomicPtr, Ordering};

/// The arguments as given, kept before they are scrubbed (`mount --daemon` re-runs itself with
/// them).
static ORIGINAL: OnceLock<Vec<OsString>> = OnceLock::new();

/// The process's arguments as they were before [`hide_passwords`], program name first.
pub fn original_args() -> &'static [OsString] {
    ORIGINAL.get_or_init(|| std::env::args_os().collect())
}

static ARGC: AtomicIsize = AtomicIsize::new(0);
static ARGV: AtomicPtr<*mut c_char> = AtomicPtr::new(std::ptr::null_mut());

/// Called by glibc before `main` with the process's arguments.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
extern "C" fn capture(argc: c_int, argv: *mut *mut c_char, _envp: *mut *mut c_char) {
    ARGC.store(argc as isize, Ordering::Relaxed);
    ARGV.store(argv, Ordering::Relaxed);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
#[used]
// SAFETY: a plain function pointer in `.init_array`; glibc calls it once, before `main`, with
// valid `argc`/`argv`/`envp`.
#[unsafe(link_section = ".init_array.00099")]
static CAPTURE: extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) = capture;

/// Where the secret part of argument `arg` starts, given the argument before it: the whole of a
/// value after `-p`/`--password`, or what follows `-p`/`--password=` in the same argument.
fn secret_start(previous: Option<&[u8]>, arg: &[u8]) -> Option<usize> {
    if matches!(previous, Some(b"-p" | b"--password")) {
        return Some(0);
    }
    if let Some(rest) = arg.strip_prefix(b"--password=") {
        return (!rest.is_empty()).then_some(arg.len() - rest.len());
    }
    if arg.starts_with(b"-p") && arg.len() > 2 && !arg.starts_with(b"--") {
        return Some(2);
    }
    None
}

/// Overwrites every password argument in the process's argument memory with NUL bytes.
#[allow(unsafe_code)]
pub fn hide_passwords() {
    original_args();
    let argc = ARGC.load(Ordering::Relaxed);
    let argv = ARGV.load(Ordering::Relaxed);
    if argv.is_null() || argc <= 0 {
        return;
    }
    let mut previous: Option<Vec<u8>> = None;
    for i in 0..argc as usize {
        // SAFETY: glibc's argv holds `argc` valid pointers to NUL-terminated strings that live
        // as long as the process; nothing else writes them (std copied them at start-up).
        let ptr = unsafe { *argv.add(i) };
        if ptr.is_null() {
            break;
        }
        // SAFETY: as above.
        let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes().to_vec();
        if previous.as_deref() == Some(b"--") {
            break;
        }
        if let Some(start) = secret_start(previous.as_deref(), &bytes) {
            // SAFETY: writes stay inside this argument's own bytes (before its NUL).
            unsafe { std::ptr::write_bytes(ptr.add(start), 0, bytes.len() - start) };
        }
        previous = Some(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::secret_start;

    #[test]
    fn finds_the_password_in_every_spelling() {
        assert_eq!(secret_start(Some(b"-p"), b"hunter2"), Some(0));
        assert_eq!(secret_start(Some(b"--password"), b"hunter2"), Some(0));
        assert_eq!(secret_start(None, b"--password=hunter2"), Some(11));
        assert_eq!(secret_start(None, b"-phunter2"), Some(2));
        assert_eq!(secret_start(None, b"--plain-http"), None);
        assert_eq!(secret_start(None, b"-p"), None);
        assert_eq!(secret_start(Some(b"-u"), b"user"), None);
    }
}
