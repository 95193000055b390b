//! Real etcd members on loopback, for tests of the etcd store (here and in the end-to-end
//! crate). Each member is an `etcd` process (Debian `etcd-server`) with its own data
//! directory; dropping the cluster kills them and removes the directories.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const ETCD: &str = "/usr/bin/etcd";

/// Whether the etcd binary (Debian `etcd-server`) is installed.
#[must_use]
pub fn etcd_installed() -> bool {
    std::path::Path::new(ETCD).exists()
}

/// The gate of every test that needs etcd: a missing etcd fails the test, here and in CI
/// alike, so such a test can never pass without having run.
pub fn require_etcd(test: &str) {
    assert!(
        etcd_installed(),
        "{test} needs {ETCD}: apt-get install etcd-server (scripts/install-deps.sh does)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one reports healthy.
    ///
    /// # Panics
    /// When etcd does not start or become healthy within 30 s.
    #[must_use]
    pub fn start(n: usize) -> Self {
        let token = format!("cw-test-{}-{}", std::process::id(), rand_suffix());
        let dir = std::env::temp_dir().join(&token);
        std::fs::create_dir_all(&dir).expect("etcd test directory");
        let members: Vec<Member> = (0..n)
            .map(|i| Member { name: format!("m{i}"), client: free_port(), peer: free_port(), child: None })
            .collect();
        let mut cluster = Self { dir, token, members };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_healthy(i, Duration::from_secs(30));
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).expect("etcd log file");
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new(ETCD)
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Fast failure detection so tests that kill members finish quickly.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize, within: Duration) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.members[i].client).into();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if health(addr).is_some_and(|b| b.contains("\"health\":\"true\"")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self.dir.join(format!("{}.log", self.members[i].name)))
            .unwrap_or_default();
        panic!("etcd member {i} not healthy within {within:?}; its log:\n{log}");
    }

    /// Client URLs of the members (dead ones included: clients must cope).
    #[must_use]
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client)).collect()
    }

    /// The index of the current leader, as the live members agree on it (waits out an
    /// election in progress).
    #[must_use]
    pub fn leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let statuses: Vec<Option<(String, String)>> = self
                .members
                .iter()
                .map(|m| m.child.as_ref().and_then(|_| member_status(([127, 0, 0, 1], m.client).into())))
                .collect();
            let leaders: std::collections::BTreeSet<&String> =
                statuses.iter().flatten().map(|(_, leader)| leader).collect();
            if let [leader] = leaders.into_iter().collect::<Vec<_>>()[..]
                && let Some(i) = statuses.iter().position(|s| s.as_ref().is_some_and(|(id, _)| id == leader))
            {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd members did not agree on a leader within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() % 1_000_000
}

/// `GET /health` on a member's client port.
fn health(addr: SocketAddr) -> Option<String> {
    http(addr, "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
}

/// One HTTP/1.0 exchange with a member's client port: the whole response, headers included.
fn http(addr: SocketAddr, request: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A member's own id and the leader's id it knows of (its gRPC gateway's maintenance
/// status; ids are decimal strings in the JSON).
fn member_status(addr: SocketAddr) -> Option<(String, String)> {
    let body = "{}";
    let response = http(
        addr,
        &format!(
            "POST /v3/maintenance/status HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )?;
    let json = response.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some((v["header"]["member_id"].as_str()?.to_owned(), v["leader"].as_str()?.to_owned()))
}
