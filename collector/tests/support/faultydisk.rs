//! A block device that fails for real: a loop device whose backing file lives on a small FUSE filesystem
//! served from this process, which answers EIO for reads and writes that touch configured byte ranges. The
//! ranges can change at any time ([`FaultyDisk::fail`], [`FaultyDisk::heal`]), so a test can make a healthy
//! disk start failing. The kernel's own block layer sees a request fail: it prints `I/O error, dev loopN,
//! sector S ...` and fires `block:block_rq_error`, exactly as for a dying disk.
//!
//! FUSE is served with the `fuser` crate, which mounts with mount(2) directly when root (no libfuse, no
//! fusermount), and the file is opened with FOPEN_DIRECT_IO so that the FUSE side keeps no page cache: every
//! read of the loop device reaches the fault table, also after a range that once read fine starts failing.
//! Test other crates can include this file by `#[path]`.
//!
//! Drop detaches the loop device, unmounts and removes the directory, also when the test panics.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

const FILE_NAME: &str = "disk.img";
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

/// The byte ranges of the backing file that fail, shared between the test and the FUSE thread.
#[derive(Clone, Default)]
pub struct Faults(Arc<RwLock<Vec<Range<u64>>>>);

impl Faults {
    fn hits(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len);
        let ranges = self.0.read().unwrap_or_else(|p| p.into_inner());
        ranges.iter().any(|r| r.start < end && start < r.end)
    }
}

struct DiskFs {
    data: Mutex<Vec<u8>>,
    faults: Faults,
    /// Read and write requests answered with EIO, to tell the kernel's retries from the test's own reads.
    failed: Arc<Mutex<u64>>,
}

impl DiskFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else if ino == FILE_INO {
            let size = self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
            (FileType::RegularFile, 0o600, size, 1)
        } else {
            return None;
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn fail(&self) -> Errno {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Errno::EIO
    }
}

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == FILE_NAME => {
                reply.entry(&TTL, &attr, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)] // the trait's signature
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk has a fixed size: times and modes are accepted and ignored.
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == FILE_INO {
            // No FUSE page cache: a range that starts failing must fail on the next read.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)] // the trait's signature
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::ENOENT);
        }
        if self.faults.hits(offset, u64::from(size)) {
            return reply.error(self.fail());
        }
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        reply.data(&data[start..end]);
    }

    #[allow(clippy::too_many_arguments)] // the trait's signature
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::ENOENT);
        }
        if self.faults.hits(offset, bytes.len() as u64) {
            return reply.error(self.fail());
        }
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        // A disk does not grow: writes past its end are refused like a device's.
        if start.saturating_add(bytes.len()) > data.len() {
            return reply.error(Errno::ENOSPC);
        }
        data[start..start + bytes.len()].copy_from_slice(bytes);
        reply.written(bytes.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted faulty file and the loop device on it. See the module documentation.
pub struct FaultyDisk {
    dir: PathBuf,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    loop_device: Option<PathBuf>,
    faults: Faults,
    failed: Arc<Mutex<u64>>,
    size: u64,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl FaultyDisk {
    /// A healthy disk of `size` bytes (a multiple of 4096), zero-filled. Fails with the reason when FUSE or
    /// loop devices are unavailable (not root, no /dev/fuse, no /dev/loop-control).
    pub fn new(tag: &str, size: u64) -> Result<FaultyDisk, String> {
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(format!("disk size {size} is not a positive multiple of 4096"));
        }
        for dev in ["/dev/fuse", "/dev/loop-control"] {
            if !Path::new(dev).exists() {
                return Err(format!("{dev} does not exist: the kernel has no FUSE or loop support here"));
            }
        }
        let dir = std::env::temp_dir().join(format!("vigil-faultydisk-{tag}-{}", std::process::id()));
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| format!("creating {}: {e}", mountpoint.display()))?;
        let faults = Faults::default();
        let failed = Arc::new(Mutex::new(0));
        let fs = DiskFs {
            data: Mutex::new(vec![0; size as usize]),
            faults: faults.clone(),
            failed: failed.clone(),
        };
        let mut disk = FaultyDisk { dir, mountpoint, session: None, loop_device: None, faults, failed, size };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("vigil-faultydisk-{tag}")),
            fuser::MountOption::Subtype("vigil-faultydisk".into()),
        ];
        let session = fuser::spawn_mount(fs, &disk.mountpoint, &config).map_err(|e| {
            format!("mounting FUSE at {} (needs root and /dev/fuse): {e}", disk.mountpoint.display())
        })?;
        disk.session = Some(session);
        let file = disk.mountpoint.join(FILE_NAME);
        let file = file.to_str().ok_or("temporary directory is not UTF-8")?;
        // Buffered I/O on the backing file: with FOPEN_DIRECT_IO it goes straight to the FUSE server anyway,
        // and the loop device stays usable on kernels whose loop driver refuses direct I/O on FUSE.
        let device = run("losetup", &["--find", "--show", "--direct-io=off", file])?;
        if !device.starts_with("/dev/loop") {
            return Err(format!("losetup printed `{device}`, not a loop device"));
        }
        disk.loop_device = Some(PathBuf::from(device));
        Ok(disk)
    }

    /// `/dev/loopN`.
    pub fn device(&self) -> &Path {
        self.loop_device.as_deref().unwrap_or(Path::new(""))
    }

    /// `loopN`, the disk's name in the kernel's messages and in sysfs.
    pub fn name(&self) -> String {
        self.device().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The loop device's `major:minor`.
    pub fn dev_numbers(&self) -> (u32, u32) {
        let text = std::fs::read_to_string(format!("/sys/block/{}/dev", self.name())).unwrap_or_default();
        let (major, minor) = text.trim().split_once(':').unwrap_or(("0", "0"));
        (major.parse().unwrap_or(0), minor.parse().unwrap_or(0))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// From now on, reads and writes that touch `bytes` of the backing file fail with EIO.
    pub fn fail(&self, bytes: Range<u64>) {
        self.faults.0.write().unwrap_or_else(|p| p.into_inner()).push(bytes);
    }

    /// Every range works again.
    pub fn heal(&self) {
        self.faults.0.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// FUSE requests answered with EIO so far.
    pub fn failed_requests(&self) -> u64 {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_direct(&self, write: bool) -> std::io::Result<File> {
        OpenOptions::new().read(true).write(write).custom_flags(libc::O_DIRECT).open(self.device())
    }

    /// Reads `len` bytes at `offset` of the loop device with O_DIRECT (both multiples of 4096): one block
    /// request, no page cache, no readahead.
    pub fn read_direct(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len + 4096];
        // O_DIRECT wants a buffer aligned to the logical block size; 4096 covers every device.
        let at = buf.as_ptr().align_offset(4096);
        let n = self.open_direct(false)?.read_at(&mut buf[at..at + len], offset)?;
        Ok(buf[at..at + n].to_vec())
    }

    /// Writes `data` (a multiple of 4096 long) at `offset` with O_DIRECT.
    pub fn write_direct(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut buf = vec![0u8; data.len() + 4096];
        let at = buf.as_ptr().align_offset(4096);
        buf[at..at + data.len()].copy_from_slice(data);
        let n = self.open_direct(true)?.write_at(&buf[at..at + data.len()], offset)?;
        if n != data.len() {
            return Err(std::io::Error::other(format!("short write: {n} of {} bytes", data.len())));
        }
        Ok(())
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        if let Some(device) = self.loop_device.take() {
            let name = self.name_of(&device);
            if let Err(e) = run("losetup", &["--detach", &device.to_string_lossy()]) {
                eprintln!("faultydisk: {e}");
            }
            // Detaching is asynchronous when the device is busy: wait for the loop to let go of the file,
            // so the unmount below finds nothing open.
            let backing = format!("/sys/block/{name}/loop/backing_file");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&backing).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(session) = self.session.take()
            && let Err(e) = session.umount_and_join()
        {
            eprintln!("faultydisk: unmounting {}: {e}; detaching it lazily", self.mountpoint.display());
            let _ = run("umount", &["--lazy", &self.mountpoint.to_string_lossy()]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FaultyDisk {
    fn name_of(&self, device: &Path) -> String {
        device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}
