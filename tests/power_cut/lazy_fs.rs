//! A FUSE file system that can lose power: every file's bytes live in memory twice, as written and as
//! made durable, and `cut` throws away whatever was written but not made durable (what a power cut does
//! to the page cache; `kill -9` leaves the page cache intact, so it cannot tell the two apart). In the
//! manner of Jepsen's LazyFS.
//!
//! # What counts as durable
//! - `fsync` / `fdatasync` on a file: all of its bytes (and its size).
//! - A write through a descriptor opened with `O_DSYNC` or `O_SYNC`: the bytes it wrote.
//! - `syncfs` / `sync`: the kernel sends `fsync` for each open file, which is the same.
//!   Metadata (create, rename, unlink, a directory's entries) is durable at once, as in LazyFS: the cut is
//!   about data.
//!
//! # Faithfulness
//! Files are opened with `FOPEN_DIRECT_IO` and every attribute has a zero TTL, so the kernel caches no page
//! and no size of its own: what a process reads after a cut is what this file system holds.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::ZERO;

#[derive(Debug, Clone)]
struct Node {
    parent: u64,
    kind: FileType,
    perm: u16,
    uid: u32,
    gid: u32,
    /// The bytes as written (what a read sees).
    data: Vec<u8>,
    /// The bytes as made durable (what survives a cut).
    durable: Vec<u8>,
    mtime: SystemTime,
}

/// Every file and directory, by inode; names by (parent, name).
#[derive(Debug, Default)]
pub struct State {
    nodes: BTreeMap<u64, Node>,
    names: BTreeMap<(u64, OsString), u64>,
    next: u64,
    /// Bytes written, and bytes thrown away by cuts (for the test's report).
    pub written: u64,
    pub lost: u64,
}

impl State {
    fn new() -> Self {
        let mut s = State {
            next: 2,
            ..Default::default()
        };
        s.nodes.insert(
            1,
            Node {
                parent: 1,
                kind: FileType::Directory,
                perm: 0o755,
                uid: 0,
                gid: 0,
                data: Vec::new(),
                durable: Vec::new(),
                mtime: SystemTime::now(),
            },
        );
        s
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let size = n.data.len() as u64;
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: n.kind,
            perm: n.perm,
            nlink: if n.kind == FileType::Directory { 2 } else { 1 },
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    fn add(&mut self, parent: u64, name: &OsStr, kind: FileType, perm: u16, req: &Request) -> u64 {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                kind,
                perm,
                uid: req.uid(),
                gid: req.gid(),
                data: Vec::new(),
                durable: Vec::new(),
                mtime: SystemTime::now(),
            },
        );
        self.names.insert((parent, name.to_owned()), ino);
        ino
    }
}

/// The handle a test keeps: the state, mounted or not, and the power switch.
#[derive(Clone)]
pub struct LazyFs {
    state: Arc<Mutex<State>>,
}

/// A mounted `LazyFs`; dropping it unmounts.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    pub path: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

impl LazyFs {
    pub fn new() -> Self {
        LazyFs {
            state: Arc::new(Mutex::new(State::new())),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts at `path` (an empty directory).
    pub fn mount(&self, path: &Path) -> std::io::Result<Mounted> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("lazyfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(Fuse(self.state.clone()), path, &config)?;
        Ok(Mounted {
            session: Some(session),
            path: path.to_path_buf(),
        })
    }

    /// The power cut: every file goes back to what was made durable. Answers the bytes lost.
    pub fn cut(&self) -> u64 {
        let mut s = self.state();
        let mut lost = 0u64;
        for n in s.nodes.values_mut() {
            if n.data != n.durable {
                lost += n
                    .data
                    .iter()
                    .zip(n.durable.iter())
                    .filter(|(a, b)| a != b)
                    .count() as u64
                    + n.data.len().abs_diff(n.durable.len()) as u64;
                n.data = n.durable.clone();
            }
        }
        s.lost += lost;
        lost
    }
}

/// Whether `/dev/fuse` can be used here (it can in CI; a machine without it skips, saying so).
pub fn available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(|_| ())
        .map_err(|e| format!("/dev/fuse cannot be opened ({e})"))
}

struct Fuse(Arc<Mutex<State>>);

impl Fuse {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn is_sync(flags: OpenFlags) -> bool {
    flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0
}

impl Filesystem for Fuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.state();
        match s
            .names
            .get(&(parent.0, name.to_owned()))
            .and_then(|i| s.attr(*i))
        {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        let Some(n) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(size) = size {
            // A new size is data: durable at the next fsync, like the bytes.
            n.data.resize(size as usize, 0);
            n.mtime = SystemTime::now();
        }
        if let Some(m) = mode {
            n.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        match s.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        if s.names.contains_key(&(parent.0, name.to_owned())) {
            return reply.error(Errno::EEXIST);
        }
        let ino = s.add(
            parent.0,
            name,
            FileType::Directory,
            (mode & 0o7777) as u16,
            req,
        );
        match s.attr(ino) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::EIO),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let ino = match s.names.get(&(parent.0, name.to_owned())) {
            Some(_) if flags & libc::O_EXCL != 0 => return reply.error(Errno::EEXIST),
            Some(i) => *i,
            None => s.add(
                parent.0,
                name,
                FileType::RegularFile,
                (mode & 0o7777) as u16,
                req,
            ),
        };
        match s.attr(ino) {
            Some(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            None => reply.error(Errno::EIO),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.state();
        let Some(n) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.0 & libc::O_TRUNC != 0 {
            n.data.clear();
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.state();
        let Some(n) = s.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let start = (offset as usize).min(n.data.len());
        let end = start.saturating_add(size as usize).min(n.data.len());
        reply.data(&n.data[start..end])
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        s.written += data.len() as u64;
        let Some(n) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let (start, end) = (offset as usize, offset as usize + data.len());
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[start..end].copy_from_slice(data);
        if is_sync(flags) {
            if n.durable.len() < end {
                n.durable.resize(end, 0);
            }
            n.durable[start..end].copy_from_slice(data);
        }
        n.mtime = SystemTime::now();
        reply.written(data.len() as u32)
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        match s.nodes.get_mut(&ino.0) {
            Some(n) => {
                n.durable = n.data.clone();
                reply.ok()
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let Some(n) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let end = (offset + length) as usize;
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        reply.ok()
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        match s.names.remove(&(parent.0, name.to_owned())) {
            Some(ino) => {
                s.nodes.remove(&ino);
                reply.ok()
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let Some(ino) = s.names.get(&(parent.0, name.to_owned())).copied() else {
            return reply.error(Errno::ENOENT);
        };
        if s.names.keys().any(|(p, _)| *p == ino) {
            return reply.error(Errno::ENOTEMPTY);
        }
        s.names.remove(&(parent.0, name.to_owned()));
        s.nodes.remove(&ino);
        reply.ok()
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let Some(ino) = s.names.remove(&(parent.0, name.to_owned())) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(old) = s.names.insert((newparent.0, newname.to_owned()), ino) {
            s.nodes.remove(&old);
        }
        if let Some(n) = s.nodes.get_mut(&ino) {
            n.parent = newparent.0;
        }
        reply.ok()
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.state();
        let parent = s.nodes.get(&ino.0).map_or(1, |n| n.parent);
        let mut entries = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        for ((p, name), child) in &s.names {
            if *p == ino.0 {
                let kind = s.nodes.get(child).map_or(FileType::RegularFile, |n| n.kind);
                entries.push((*child, kind, name.clone()));
            }
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 64 GiB, nearly all free: the spool's free-space floor never refuses on this file system.
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20, 4096, 255, 4096)
    }
}
