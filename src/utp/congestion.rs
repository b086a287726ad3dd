//! How much a connection may have in flight and when to retransmit: the RTT/RTO estimator
//! of BEP 29 and LEDBAT congestion control (BEP 29, with slow start and loss handling as
//! libtorrent 2.0 does them). Pure arithmetic: time comes in as arguments.

use std::time::{Duration, Instant};

/// BEP 29 and libtorrent's `utp_min_timeout`: a packet is never declared lost sooner.
pub const RTO_MIN: Duration = Duration::from_millis(500);
/// BEP 29: before any RTT sample.
pub const RTO_INITIAL: Duration = Duration::from_millis(1000);
/// Back-off stops doubling here (libtorrent caps its packet timeout at 60 s).
pub const RTO_MAX: Duration = Duration::from_secs(60);

/// BEP 29's `MAX_CWND_INCREASE_PACKETS_PER_RTT`, in bytes: libtorrent's `utp_gain_factor`
/// default (3000 bytes per RTT at zero queuing delay).
const GAIN_BYTES_PER_RTT: f64 = 3000.0;
/// libtorrent's `utp_cwnd_reduce_timer`: the window is cut for loss at most this often.
const LOSS_CUT_INTERVAL: Duration = Duration::from_millis(100);
/// BEP 29: base delay is the minimum over the last two minutes, kept as two one-minute
/// buckets.
const BASE_DELAY_BUCKET: Duration = Duration::from_secs(60);
/// libtorrent uses the minimum of the last 3 delay samples: filters one-off spikes.
const DELAY_SAMPLES: usize = 3;

/// Smoothed RTT and its variance (BEP 29 formula), and the retransmission timeout.
#[derive(Clone, Debug, Default)]
pub struct RttEstimator {
    /// Microseconds; `None` before the first sample.
    srtt_us: Option<f64>,
    rttvar_us: f64,
}

impl RttEstimator {
    /// A sample from a packet that was sent exactly once (Karn: a retransmitted packet's
    /// ack cannot tell which copy it answers).
    pub fn on_sample(&mut self, rtt: Duration) {
        // Through u64: a u128 → f64 conversion is a libcall (`__floattidf`, per ack in the
        // profile); no RTT is 2^64 µs.
        let sample = rtt.as_micros() as u64 as f64;
        match self.srtt_us {
            None => {
                self.srtt_us = Some(sample);
                self.rttvar_us = sample / 2.0;
            }
            Some(srtt) => {
                let delta = srtt - sample;
                self.rttvar_us += (delta.abs() - self.rttvar_us) / 4.0;
                self.srtt_us = Some(srtt + (sample - srtt) / 8.0);
            }
        }
    }

    pub fn smoothed(&self) -> Option<Duration> {
        self.srtt_us.map(|us| Duration::from_micros(us as u64))
    }

    /// BEP 29: `max(rtt + 4 * rtt_var, 500 ms)`, 1 s before any sample; doubled for every
    /// consecutive timeout, capped at `RTO_MAX`.
    pub fn rto(&self, consecutive_timeouts: u32) -> Duration {
        let base = match self.srtt_us {
            None => RTO_INITIAL,
            Some(srtt) => Duration::from_micros((srtt + 4.0 * self.rttvar_us) as u64).max(RTO_MIN),
        };
        base.saturating_mul(1u32 << consecutive_timeouts.min(16))
            .min(RTO_MAX)
    }
}

/// LEDBAT window in bytes with slow start, as libtorrent's `do_ledbat`.
#[derive(Clone, Debug)]
pub struct Ledbat {
    cwnd: f64,
    /// One packet: the window never goes below it (libtorrent floors at one MTU).
    cwnd_min: f64,
    cwnd_max: f64,
    slow_start: bool,
    /// 0 = none yet.
    ssthresh: f64,
    target_us: f64,
    /// Rolling minimum of the peer's `timestamp_difference` samples: (this minute's min,
    /// last minute's min), wrapping-aware (the values are clock differences mod 2^32).
    base_now: Option<u32>,
    base_prev: Option<u32>,
    bucket_start: Option<Instant>,
    /// Queuing delays (sample - base) of the last few packets, microseconds.
    recent_delays_us: [u32; DELAY_SAMPLES],
    recent_at: usize,
    /// No loss cut before this.
    next_cut: Option<Instant>,
}

/// `a` is smaller than `b` as clock differences (mod 2^32).
fn wrapping_less(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl Ledbat {
    pub fn new(
        packet_bytes: usize,
        initial_packets: usize,
        max_bytes: usize,
        target: Duration,
    ) -> Self {
        let cwnd_min = packet_bytes as f64;
        Ledbat {
            cwnd: (packet_bytes * initial_packets) as f64,
            cwnd_min,
            cwnd_max: (max_bytes as f64).max(cwnd_min),
            slow_start: true,
            ssthresh: 0.0,
            target_us: target.as_micros().max(1) as f64,
            base_now: None,
            base_prev: None,
            bucket_start: None,
            recent_delays_us: [u32::MAX; DELAY_SAMPLES],
            recent_at: 0,
            next_cut: None,
        }
    }

    pub fn window(&self) -> usize {
        self.cwnd as usize
    }

    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// The peer's measurement of our one-way delay (`timestamp_difference_microseconds`
    /// of a packet it sent; 0 = none).
    pub fn on_delay_sample(&mut self, sample_us: u32, now: Instant) {
        if sample_us == 0 {
            return;
        }
        let start = *self.bucket_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= BASE_DELAY_BUCKET {
            self.base_prev = self.base_now.take();
            self.bucket_start = Some(now);
        }
        match self.base_now {
            Some(b) if !wrapping_less(sample_us, b) => {}
            _ => self.base_now = Some(sample_us),
        }
        let base = match (self.base_now, self.base_prev) {
            (Some(a), Some(b)) if wrapping_less(b, a) => b,
            (Some(a), _) => a,
            (None, _) => sample_us,
        };
        let queuing = sample_us.wrapping_sub(base);
        // A sample below the base would be negative queuing delay: treat as none.
        let queuing = if (queuing as i32) < 0 { 0 } else { queuing };
        self.recent_delays_us[self.recent_at] = queuing;
        self.recent_at = (self.recent_at + 1) % DELAY_SAMPLES;
    }

    /// The current estimate of our queuing delay, if any sample came in.
    pub fn queuing_delay(&self) -> Option<Duration> {
        let d = *self.recent_delays_us.iter().min().expect("non-empty");
        (d != u32::MAX).then(|| Duration::from_micros(u64::from(d)))
    }

    /// `acked_bytes` of payload newly acked by one packet; `in_flight_before` the bytes
    /// in flight before it; `in_flight_after` after; `min_rtt` the shortest RTT among the
    /// packets it acked (the one-way delay can never exceed it).
    pub fn on_ack(
        &mut self,
        acked_bytes: usize,
        in_flight_before: usize,
        in_flight_after: usize,
        min_rtt: Option<Duration>,
    ) {
        if acked_bytes == 0 || in_flight_before == 0 {
            return;
        }
        let Some(mut delay) = self.queuing_delay() else {
            // No delay sample yet (the peer has none of ours): grow only in slow start.
            if self.slow_start {
                self.grow(acked_bytes as f64, in_flight_after, acked_bytes);
            }
            return;
        };
        if let Some(rtt) = min_rtt {
            delay = delay.min(rtt);
        }
        let delay_us = delay.as_micros() as u64 as f64;
        if delay_us >= self.target_us && self.slow_start {
            self.ssthresh = self.cwnd / 2.0;
            self.slow_start = false;
        }
        let window_factor = acked_bytes as f64 / in_flight_before as f64;
        let delay_factor = (self.target_us - delay_us) / self.target_us;
        let linear = GAIN_BYTES_PER_RTT * window_factor * delay_factor;
        let gain = if self.slow_start {
            let exponential = acked_bytes as f64;
            if self.ssthresh != 0.0 && self.cwnd + exponential > self.ssthresh {
                self.slow_start = false;
                linear
            } else {
                exponential.max(linear)
            }
        } else {
            linear
        };
        self.grow(gain, in_flight_after, acked_bytes);
    }

    fn grow(&mut self, gain: f64, in_flight_after: usize, acked_bytes: usize) {
        // Only an application that fills the window may grow it (libtorrent's
        // `cwnd_saturated`); shrinking always applies.
        let saturated = (in_flight_after + acked_bytes) as f64 + self.cwnd_min > self.cwnd;
        if gain > 0.0 && !saturated {
            return;
        }
        self.cwnd = (self.cwnd + gain).clamp(self.cwnd_min, self.cwnd_max);
    }

    /// A packet was lost (3 duplicate acks or 3 later packets selectively acked). Halves
    /// the window once per `LOSS_CUT_INTERVAL`; the caller limits it to once per window
    /// of packets. Returns whether it cut.
    pub fn on_loss(&mut self, now: Instant) -> bool {
        if self.next_cut.is_some_and(|t| now < t) {
            return false;
        }
        self.next_cut = Some(now + LOSS_CUT_INTERVAL);
        self.cwnd = (self.cwnd / 2.0).max(self.cwnd_min);
        if self.slow_start {
            self.ssthresh = self.cwnd;
            self.slow_start = false;
        }
        true
    }

    /// The retransmission timer fired with packets in flight: one packet, slow start
    /// again (up to the threshold the last loss left).
    pub fn on_timeout(&mut self) {
        self.cwnd = self.cwnd_min;
        self.slow_start = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rto_follows_bep29_with_floor_and_backoff() {
        let mut r = RttEstimator::default();
        assert_eq!(r.rto(0), RTO_INITIAL);
        assert_eq!(r.rto(1), 2 * RTO_INITIAL);
        r.on_sample(Duration::from_millis(40));
        // 40 + 4 * 20 = 120 ms, floored at 500.
        assert_eq!(r.rto(0), RTO_MIN);
        for _ in 0..50 {
            r.on_sample(Duration::from_millis(400));
        }
        let rto = r.rto(0);
        assert!(
            rto > Duration::from_millis(400) && rto < Duration::from_millis(700),
            "{rto:?}"
        );
        assert_eq!(r.rto(30), RTO_MAX);
        let s = r.smoothed().unwrap();
        assert!(s > Duration::from_millis(390), "{s:?}");
    }

    #[test]
    fn slow_start_then_delay_based() {
        let t0 = Instant::now();
        let mss = 1000;
        let mut l = Ledbat::new(mss, 2, 1_000_000, Duration::from_millis(100));
        // Base delay 5 ms, no queuing: slow start doubles per window.
        l.on_delay_sample(5_000, t0);
        let w0 = l.window();
        l.on_ack(w0, w0, 0, Some(Duration::from_millis(10)));
        // max(exponential: +acked bytes, linear: +3000 at zero delay), as libtorrent.
        assert_eq!(l.window(), w0 + 3000);
        assert!(l.in_slow_start());
        // Queuing delay above target: leave slow start, shrink.
        l.on_delay_sample(5_000 + 150_000, t0);
        l.on_delay_sample(5_000 + 150_000, t0);
        l.on_delay_sample(5_000 + 150_000, t0);
        let w1 = l.window();
        l.on_ack(mss, w1, w1 - mss, None);
        assert!(!l.in_slow_start());
        assert!(l.window() < w1, "{} < {w1}", l.window());
        // Loss halves once per interval; timeout goes to one packet.
        let w2 = l.window();
        assert!(l.on_loss(t0));
        assert_eq!(l.window(), (w2 / 2).max(mss));
        assert!(!l.on_loss(t0 + Duration::from_millis(50)));
        l.on_timeout();
        assert_eq!(l.window(), mss);
        assert!(l.in_slow_start());
    }

    #[test]
    fn base_delay_is_a_wrapping_rolling_minimum() {
        let t0 = Instant::now();
        let mut l = Ledbat::new(1000, 2, 100_000, Duration::from_millis(100));
        // Samples straddling u32::MAX: the base is the earliest in wrapping order.
        l.on_delay_sample(u32::MAX - 1_000, t0);
        l.on_delay_sample(9_000, t0);
        assert_eq!(l.queuing_delay(), Some(Duration::from_micros(0)));
        l.on_delay_sample(9_000, t0);
        l.on_delay_sample(9_000, t0);
        assert_eq!(l.queuing_delay(), Some(Duration::from_micros(10_001)));
        // Two minutes later the old minimum has rolled out.
        l.on_delay_sample(20_000, t0 + Duration::from_secs(61));
        l.on_delay_sample(20_000, t0 + Duration::from_secs(122));
        l.on_delay_sample(20_000, t0 + Duration::from_secs(122));
        l.on_delay_sample(20_000, t0 + Duration::from_secs(122));
        assert_eq!(l.queuing_delay(), Some(Duration::from_micros(0)));
    }
}
