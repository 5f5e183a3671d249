//! An on-path relay: listens on a loopback port, forwards every connection to a target, whole TLS
//! records at a time from the connecting side, and once armed alters the first record it forwards
//! after that (one bit flipped, or the record sent twice), or records what the connecting side sent.
//! It is the attacker of issue 10 that forwards the handshake untouched and rewrites what follows.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the relay does to the first record from the connecting side once it is armed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tamper {
    /// Flip one bit in the middle of its ciphertext.
    FlipBit,
    /// Forward it twice.
    Replay,
}

/// When the relay arms itself.
#[derive(Clone, Copy, Debug)]
pub enum Arm {
    /// When [`Relay::arm`] is called.
    ByHand,
    /// Once this many bytes went from the connecting side to the target (all connections together).
    AfterBytes(u64),
}

/// The relay; dropping it stops accepting. Its connections end as their ends close: when either
/// direction ends, the relay closes both sockets (drops all its handles), as a forwarding process
/// would, so that a side still writing gets a reset rather than a window that never opens.
pub struct Relay {
    pub addr: String,
    armed: Arc<AtomicBool>,
    tampered: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Everything the connecting side of the first connection sent.
    recorded: Arc<Mutex<Vec<u8>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// A relay to `target` that applies `tamper` once armed per `arm`.
    pub fn start(target: &str, tamper: Tamper, arm: Arm) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listener");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().unwrap().to_string();
        let armed = Arc::new(AtomicBool::new(false));
        let tampered = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let forwarded = Arc::new(AtomicU64::new(0));
        let accept = {
            let (armed, tampered, stop, recorded) = (armed.clone(), tampered.clone(), stop.clone(), recorded.clone());
            let target = target.to_string();
            std::thread::spawn(move || {
                let mut first = true;
                while !stop.load(Ordering::SeqCst) {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    client.set_nonblocking(false).unwrap();
                    let Ok(server) = TcpStream::connect(&target) else {
                        continue;
                    };
                    // Target to client: as it comes. When either direction ends, both sockets close, as
                    // they would at a relay that is a forwarding process.
                    let (mut from, mut to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                    // Client to target: record by record.
                    let record_this = std::mem::take(&mut first);
                    let (armed, tampered, recorded, forwarded) =
                        (armed.clone(), tampered.clone(), recorded.clone(), forwarded.clone());
                    std::thread::spawn(move || {
                        let (mut from, mut to) = (client, server);
                        loop {
                            let mut header = [0u8; 5];
                            if from.read_exact(&mut header).is_err() {
                                break;
                            }
                            let len = u16::from_be_bytes([header[3], header[4]]) as usize;
                            let mut record = header.to_vec();
                            record.resize(5 + len, 0);
                            if from.read_exact(&mut record[5..]).is_err() {
                                break;
                            }
                            if record_this {
                                recorded.lock().unwrap().extend_from_slice(&record);
                            }
                            if let Arm::AfterBytes(n) = arm {
                                if forwarded.load(Ordering::SeqCst) >= n {
                                    armed.store(true, Ordering::SeqCst);
                                }
                            }
                            let mut copies = 1;
                            if armed.load(Ordering::SeqCst) && !tampered.swap(true, Ordering::SeqCst) {
                                match tamper {
                                    Tamper::FlipBit => record[5 + len / 2] ^= 0x10,
                                    Tamper::Replay => copies = 2,
                                }
                            }
                            forwarded.fetch_add(record.len() as u64, Ordering::SeqCst);
                            if (0..copies).any(|_| to.write_all(&record).is_err()) {
                                break;
                            }
                        }
                        // The target hears the end (or has gone); what it still says, e.g. why it
                        // refused, reaches the client through the other direction, which closes both.
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            })
        };
        Relay {
            addr,
            armed,
            tampered,
            stop,
            recorded,
            accept: Some(accept),
        }
    }

    /// Arms the relay: the next record from a connecting side is altered.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether a record was altered.
    pub fn tampered(&self) -> bool {
        self.tampered.load(Ordering::SeqCst)
    }

    /// What the connecting side of the first connection sent so far.
    pub fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}
