//! The child-process harness shared by the tests and the load tool: a guard that ends its
//! process however the caller ends, free loopback ports, and the gateway binary under test.
//! (The load tool includes this file with `#[path]`.)

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

/// A child process, ended when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// SIGTERM first (with 2 s to exit) rather than SIGKILL at once: nginx's master then stops
    /// its workers, which a SIGKILL would leave running.
    polite: bool,
}

impl Process {
    /// `child`, killed (SIGKILL) when dropped.
    pub fn new(child: Child) -> Process {
        Process {
            child,
            polite: false,
        }
    }

    /// `child`, sent SIGTERM when dropped, and SIGKILL if it has not exited within 2 s.
    pub fn polite(child: Child) -> Process {
        Process {
            child,
            polite: true,
        }
    }

    /// Its pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The process itself (to signal it, wait for it, or look at its exit status).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `signal` (SIGTERM, SIGHUP, ...).
    pub fn signal(&self, signal: i32) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.polite {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback TCP port, never the same one twice in this process.
///
/// Picked at random below the kernel's ephemeral range (32768 and up on Linux): a port the kernel
/// hands out for `bind(0)` or an outgoing connection could be handed to another test process in
/// the instant between this check and the gateway's own bind, and two test processes picking
/// the same port at random out of 12,000 is rare enough.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = rand::random_range(20_000..32_000u16);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
}

/// The gateway binary under test: this build's, or the one `DUPLEX_GATEWAY_BIN` names (to run
/// the black-box tests, or the load, against another build).
pub fn gateway_binary() -> PathBuf {
    std::env::var_os("DUPLEX_GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_duplex-gateway")))
}
