//! The DNS server: hickory-server's UDP and TCP front ends, with a handler that answers from
//! the current [`Catalog`] and [`Health`]. The handler never blocks and never waits on the
//! broker: the catalog is swapped in whole when records change.
//!
//! A client that floods the server is held to a per-source budget (token bucket): past it,
//! its queries are dropped unanswered (as a stub resolver would see a loss, and retry), while
//! every other client keeps its own budget.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::zone::{Catalog, Health};

/// What the handler answers from, swapped in whole.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub catalog: Arc<Catalog>,
    pub health: Health,
}

/// Per-source query budget.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub per_second: f64,
    pub burst: f64,
}

impl Default for Budget {
    /// Far above what a pod's resolver asks (a few queries per connection), far below what
    /// one client can send.
    fn default() -> Self {
        Self { per_second: 500.0, burst: 1000.0 }
    }
}

/// Most sources tracked at once; past it, idle ones are forgotten first.
const MAX_SOURCES: usize = 65_536;

#[derive(Debug)]
struct Limiter {
    budget: Budget,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl Limiter {
    fn allow(&mut self, src: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&src) {
            let idle = Duration::from_secs_f64(self.budget.burst / self.budget.per_second);
            self.buckets.retain(|_, (_, last)| now.duration_since(*last) < idle);
            if self.buckets.len() >= MAX_SOURCES {
                // Everyone is busy: a new source waits until someone goes quiet.
                return false;
            }
        }
        let b = self.budget;
        let (tokens, last) = self.buckets.entry(src).or_insert((b.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * b.per_second).min(b.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub answered: AtomicU64,
    pub nxdomain: AtomicU64,
    pub refused: AtomicU64,
    pub dropped_over_budget: AtomicU64,
}

/// hickory-server's request handler for `clusterset.local`.
pub struct Handler {
    snapshot: watch::Receiver<Snapshot>,
    limiter: Mutex<Limiter>,
    pub stats: Arc<Stats>,
}

impl Handler {
    #[must_use]
    pub fn new(snapshot: watch::Receiver<Snapshot>, budget: Budget, stats: Arc<Stats>) -> Self {
        Self { snapshot, limiter: Mutex::new(Limiter { budget, buckets: HashMap::new() }), stats }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let allowed = self.limiter.lock().expect("limiter lock").allow(request.src().ip(), Instant::now());
        if !allowed {
            self.stats.dropped_over_budget.fetch_add(1, Ordering::Relaxed);
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::Refused;
            return ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() });
        }
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e.set_version(0);
            e
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            let response = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return send(response_handle, response, request).await;
        }
        let Ok(info) = request.request_info() else {
            let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return send(response_handle, response, request).await;
        };
        let query = info.query;
        let snapshot = self.snapshot.borrow().clone();
        let answer = snapshot.catalog.answer(&query.name().into(), query.query_type(), &snapshot.health);
        match answer.code {
            ResponseCode::NXDomain => self.stats.nxdomain.fetch_add(1, Ordering::Relaxed),
            ResponseCode::Refused => self.stats.refused.fetch_add(1, Ordering::Relaxed),
            _ => self.stats.answered.fetch_add(1, Ordering::Relaxed),
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = answer.authoritative;
        metadata.response_code = answer.code;
        let response = builder.build(metadata, &answer.answers, [], &answer.soa, &answer.additionals);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, "sending a DNS response failed");
                failed(request)
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    mut handle: R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            debug!(%error, "sending a DNS error response failed");
            failed(request)
        }
    }
}

fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

/// Serves `clusterset.local` on UDP and TCP at `listen` until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    snapshot: watch::Receiver<Snapshot>,
    budget: Budget,
    stats: Arc<Stats>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let udp = tokio::net::UdpSocket::bind(listen).await?;
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    serve_on(udp, tcp, snapshot, budget, stats, shutdown).await
}

/// [`serve`] on sockets the caller bound.
pub async fn serve_on(
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    snapshot: watch::Receiver<Snapshot>,
    budget: Budget,
    stats: Arc<Stats>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let mut server = hickory_server::Server::new(Handler::new(snapshot, budget, stats));
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64);
    tokio::select! {
        r = server.block_until_done() => {
            if let Err(e) = &r {
                warn!(error = %e, "DNS server stopped");
            }
            r.map_err(std::io::Error::other)
        }
        () = shutdown => {
            server.shutdown_gracefully().await.map_err(std::io::Error::other)
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };

    use super::*;

    /// Garbage on the DNS port (random bytes, a bare header, a response, an update, two
    /// questions) gets no answer or a clear error, and the server keeps answering queries.
    #[tokio::test]
    async fn garbage_on_the_port_does_not_stop_the_answers() {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_tx, rx) = watch::channel(Snapshot {
            catalog: Arc::new(Catalog::new(&[], "east", 5, 1)),
            health: Health::Unknown,
        });
        let stats = Arc::new(Stats::default());
        tokio::spawn(serve_on(udp, tcp, rx, Budget::default(), stats.clone(), std::future::pending()));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let query = |id: u16, name: &str| {
            let mut m = Message::new(id, hickory_proto::op::MessageType::Query, OpCode::Query);
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::TXT));
            m.to_vec().unwrap()
        };
        let mut two = Message::new(9, hickory_proto::op::MessageType::Query, OpCode::Query);
        two.add_query(Query::query(Name::from_ascii("a.clusterset.local.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_ascii("b.clusterset.local.").unwrap(), RecordType::A));
        let mut response = Message::new(8, hickory_proto::op::MessageType::Response, OpCode::Query);
        response.add_query(Query::query(Name::from_ascii("x.clusterset.local.").unwrap(), RecordType::A));
        let mut update = Message::new(7, hickory_proto::op::MessageType::Query, OpCode::Update);
        update.add_query(Query::query(Name::from_ascii("clusterset.local.").unwrap(), RecordType::SOA));
        let junk: Vec<Vec<u8>> = vec![
            (0..200u8).map(|i| i.wrapping_mul(37)).collect(),
            vec![0; 12],
            vec![0xff; 5],
            response.to_vec().unwrap(),
            update.to_vec().unwrap(),
            two.to_vec().unwrap(),
        ];
        for j in &junk {
            client.send(j).await.unwrap();
        }
        client.send(&query(4242, "dns-version.clusterset.local.")).await.unwrap();
        // Whatever came back for the junk is an error; the last answer is the real one.
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("the server still answers")
                .unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            if m.metadata.id == 4242 {
                assert_eq!(m.metadata.response_code, ResponseCode::NoError);
                assert_eq!(m.answers[0].data.to_string(), "1.0.0");
                break;
            }
            assert_ne!(m.metadata.response_code, ResponseCode::NoError, "junk answered as if valid: {m:?}");
        }
    }

    #[test]
    fn a_flooding_source_is_held_to_its_budget_and_others_keep_theirs() {
        let mut l = Limiter { budget: Budget { per_second: 100.0, burst: 10.0 }, buckets: HashMap::new() };
        let t0 = Instant::now();
        let (flood, other): (IpAddr, IpAddr) = ("10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap());
        let allowed = (0..1000).filter(|_| l.allow(flood, t0)).count();
        assert_eq!(allowed, 10, "the burst, then nothing at the same instant");
        assert!(l.allow(other, t0), "another source has its own budget");
        // 100 ms later the flooder has earned 10 more.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..1000).filter(|_| l.allow(flood, t1)).count(), 10);
    }
}
