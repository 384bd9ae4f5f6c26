//! Reading kgate's pinned sock hashes (`<pin>/peers`, `<pin>/spliced`) from the tests:
//! how many sockets are spliced right now, and whether a closed connection left any
//! entry behind.
//!
//! The maps only exist while kgate runs with the sockmap data plane, under the pin
//! directory of its config; kgate mounts the bpffs at /sys/fs/bpf itself if needed.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{Map, MapData, SockHash};

use crate::proc;

/// Number of keys in the pinned sock hash at `path` (keys are socket cookies, `u64`).
///
/// A snapshot: kgate may add and remove entries while it is being read. Errors when
/// nothing is pinned at `path` or when it is not a sock hash with 8-byte keys.
pub fn sock_hash_len(path: &Path) -> anyhow::Result<usize> {
    let data = MapData::from_pin(path).with_context(|| {
        format!(
            "no BPF map pinned at {}: is kgate running with the sockmap data plane and this bpf_pin_path?",
            path.display()
        )
    })?;
    let max_entries = data
        .info()
        .with_context(|| format!("reading the map info of {}", path.display()))?
        .max_entries();
    let map = Map::from_map_data(data)
        .with_context(|| format!("{} is a map type aya does not know", path.display()))?;
    let hash = SockHash::<MapData, u64>::try_from(map)
        .with_context(|| format!("{} is not a sock hash with u64 keys", path.display()))?;
    // When a key is deleted under the iterator, the kernel restarts from the first key:
    // a set removes the repeats, and the bound ends the walk even under heavy churn.
    let bound = 4 * max_entries as usize + 16;
    let mut keys = HashSet::new();
    for key in hash.keys().take(bound) {
        keys.insert(key.with_context(|| format!("walking the keys of {}", path.display()))?);
    }
    Ok(keys.len())
}

/// Waits until the sock hash at `path` holds `expected` keys; returns the last count
/// seen (equal to `expected` unless it timed out). Entries leave the maps a moment after
/// a connection closes, so tests that count them need to wait.
pub fn wait_sock_hash_len(
    path: &Path,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let len = sock_hash_len(path)?;
        if len == expected || Instant::now() >= deadline {
            return Ok(len);
        }
        std::thread::sleep(proc::POLL.max(Duration::from_millis(10)));
    }
}

#[cfg(test)]
mod tests {
    //! Without kgate, the tests make and pin a sock hash themselves with the bpf(2)
    //! syscall, in a bpffs mounted privately under the lab's temp directory.

    use super::*;
    use crate::lab::{Lab, skip_without_root};
    use std::ffi::CString;
    use std::io;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_SOCKHASH: u32 = 18;

    /// `union bpf_attr`, as raw bytes: the few fields used here are at fixed offsets.
    #[repr(C, align(8))]
    struct BpfAttr([u8; 128]);

    impl BpfAttr {
        fn new() -> Self {
            BpfAttr([0; 128])
        }
        fn u32_at(mut self, offset: usize, value: u32) -> Self {
            self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
            self
        }
        fn u64_at(mut self, offset: usize, value: u64) -> Self {
            self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
            self
        }
    }

    fn bpf(cmd: libc::c_long, attr: &BpfAttr) -> io::Result<i64> {
        // SAFETY: bpf(2) with a zeroed attr of the declared size; pointers inside it
        // (key, value, path) point to locals that outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const BpfAttr, 128u32) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn create_map(map_type: u32, max_entries: u32) -> OwnedFd {
        let attr = BpfAttr::new()
            .u32_at(0, map_type)
            .u32_at(4, 8) // key: u64 cookie
            .u32_at(8, 4) // value: u32 socket fd
            .u32_at(12, max_entries);
        let fd = bpf(BPF_MAP_CREATE, &attr).expect("BPF_MAP_CREATE");
        // SAFETY: a new fd returned by the kernel, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
    }

    fn pin(map: &OwnedFd, path: &Path) {
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let attr = BpfAttr::new()
            .u64_at(0, path.as_ptr() as u64)
            .u32_at(8, map.as_raw_fd() as u32);
        bpf(BPF_OBJ_PIN, &attr).expect("BPF_OBJ_PIN");
    }

    fn insert(map: &OwnedFd, key: u64, socket: &impl AsRawFd) {
        let value = socket.as_raw_fd() as u32;
        let attr = BpfAttr::new()
            .u32_at(0, map.as_raw_fd() as u32)
            .u64_at(8, &key as *const u64 as u64)
            .u64_at(16, &value as *const u32 as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &attr).expect("BPF_MAP_UPDATE_ELEM");
    }

    /// A private bpffs mount, unmounted on drop (also when the test fails).
    struct BpfFs(PathBuf);

    impl BpfFs {
        fn mount(dir: PathBuf) -> BpfFs {
            std::fs::create_dir_all(&dir).unwrap();
            let c = |s: &[u8]| CString::new(s).unwrap();
            let target = c(dir.as_os_str().as_bytes());
            // SAFETY: mount(2) with valid C strings and no data.
            let rc = unsafe {
                libc::mount(
                    c(b"bpf").as_ptr(),
                    target.as_ptr(),
                    c(b"bpf").as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            assert_eq!(
                rc,
                0,
                "mounting a bpffs at {}: {}",
                dir.display(),
                io::Error::last_os_error()
            );
            BpfFs(dir)
        }
    }

    impl Drop for BpfFs {
        fn drop(&mut self) {
            if let Ok(target) = CString::new(self.0.as_os_str().as_bytes()) {
                // SAFETY: umount2(2) with a valid C string.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }

    #[test]
    fn counts_the_sockets_in_a_pinned_sock_hash() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(0);
        let bpffs = BpfFs::mount(lab.temp_dir().join("bpffs"));
        let peers = bpffs.0.join("peers");
        let other = bpffs.0.join("other");

        assert!(sock_hash_len(&peers).is_err(), "nothing pinned yet");

        let map = create_map(BPF_MAP_TYPE_SOCKHASH, 64);
        pin(&map, &peers);
        assert_eq!(sock_hash_len(&peers).unwrap(), 0);

        // Sock hashes take established TCP sockets: make a pair inside the lab.
        let (a, b) = lab.client().run(|| {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (b, _) = listener.accept().unwrap();
            (a, b)
        });
        insert(&map, 1, &a);
        insert(&map, 2, &b);
        assert_eq!(sock_hash_len(&peers).unwrap(), 2);
        assert_eq!(
            wait_sock_hash_len(&peers, 2, Duration::from_secs(1)).unwrap(),
            2
        );

        // The kernel drops an entry when its socket closes.
        drop(a);
        assert_eq!(
            wait_sock_hash_len(&peers, 1, Duration::from_secs(5)).unwrap(),
            1
        );

        let hash = create_map(BPF_MAP_TYPE_HASH, 4);
        pin(&hash, &other);
        let error = format!("{:#}", sock_hash_len(&other).unwrap_err());
        assert!(error.contains("not a sock hash"), "{error}");
        drop(b);
    }

    #[test]
    fn a_missing_pin_is_an_error_that_says_what_to_check() {
        let error = sock_hash_len(Path::new("/nonexistent/kgate/peers")).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("no BPF map pinned at /nonexistent/kgate/peers"),
            "{message}"
        );
    }
}
