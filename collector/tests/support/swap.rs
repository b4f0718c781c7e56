//! A swapfile that exists for one test or benchmark: made under /var/tmp, turned on, and turned off and
//! removed by `Drop` (also when the test fails). The host keeps no swap of Vigil's making.

use std::path::PathBuf;
use std::process::Command;

pub struct Swapfile(pub PathBuf);

impl Swapfile {
    /// A swapfile of `mib` MiB, named after `tag` and this process.
    pub fn new(tag: &str, mib: u64) -> Swapfile {
        let path = PathBuf::from(format!("/var/tmp/vigil-{tag}-swap-{}", std::process::id()));
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run swap setup command");
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let _ = Command::new("swapoff").arg(&path).output();
        // Owned from here on, so a failed step still removes the file.
        let swap = Swapfile(path);
        run(Command::new("dd")
            .args(["if=/dev/zero", "bs=16M", &format!("count={}", mib.div_ceil(16)), "status=none"])
            .arg(format!("of={}", swap.0.display())));
        run(Command::new("chmod").arg("600").arg(&swap.0));
        run(Command::new("mkswap").arg("-q").arg(&swap.0));
        run(Command::new("swapon").arg(&swap.0));
        swap
    }
}

impl Drop for Swapfile {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).output();
        let _ = std::fs::remove_file(&self.0);
    }
}
