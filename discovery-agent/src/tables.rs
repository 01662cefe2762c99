//! Pure builders of the slot tables the maps hold for a service: Walker's
//! alias table (weighted random, least-connections) and weighted Maglev
//! (consistent), and [`desired_slots`], the table a desired service should
//! have, resolved to backend addresses. No map access: the same input gives
//! the same table on every node.
use crate::{
    addr::Addr,
    desired::DesiredService,
    schema::{BackendDef, Policy},
};

/// One slot resolved to addresses: (backend, alias, threshold).
pub type ResolvedSlot = (Addr, Addr, u32);

/// Walker's alias table over the weights: one column per backend, built so
/// that choosing a column uniformly and then the column's backend with
/// probability `threshold / 2^32` (else its alias) picks backend i with
/// probability `w_i / sum(w)`. Weight-0 backends get no traffic unless every
/// backend has weight 0, in which case all are used equally (a service that
/// is entirely draining still answers rather than failing).
pub fn alias_table(weights: &[u32]) -> Vec<(usize, usize, u32)> {
    let live: Vec<usize> = if weights.iter().any(|&w| w > 0) {
        (0..weights.len()).filter(|&i| weights[i] > 0).collect()
    } else {
        (0..weights.len()).collect()
    };
    let n = live.len();
    if n == 0 {
        return Vec::new();
    }
    let total: u64 = live.iter().map(|&i| u64::from(weights[i].max(1))).sum();
    // Scaled probabilities p_i * n * 2^32, exact in integers (n*w fits: w <=
    // 65535 and n <= 2^20).
    let one: u128 = 1 << 32;
    let mut prob: Vec<u128> = live
        .iter()
        .map(|&i| u128::from(weights[i].max(1)) * n as u128 * one / u128::from(total))
        .collect();
    let mut alias: Vec<usize> = (0..n).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&j| prob[j] < one);
    while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
        alias[s] = l;
        prob[l] -= one - prob[s];
        if prob[l] < one {
            large.pop();
            small.push(l);
        }
    }
    // Leftovers are 1 up to rounding: always their own backend.
    for j in small.into_iter().chain(large) {
        prob[j] = one;
        alias[j] = j;
    }
    (0..n)
        .map(|j| {
            let t = if prob[j] >= one {
                u32::MAX
            } else {
                prob[j] as u32
            };
            (live[j], live[alias[j]], t)
        })
        .collect()
}

/// Maglev table sizes: primes, each about four times the last. A service
/// uses the smallest one with at least 100 slots per backend, so removing
/// one of n backends moves close to the ideal 1/n of the workloads. The
/// size must not follow n exactly: a new size remaps every workload, which
/// happens only when a service crosses one of these steps.
const MAGLEV_SIZES: [usize; 4] = [1_021, 4_093, 16_381, 65_521];

pub fn maglev_size(n: usize) -> usize {
    MAGLEV_SIZES
        .iter()
        .copied()
        .find(|&m| m >= n.saturating_mul(100))
        .unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1])
}

/// FNV-1a: stable across nodes and releases. Every node must build the same
/// table, and changing this would move every workload once.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Weighted Maglev (Eisenbud et al., NSDI 2016): each backend walks its
/// own permutation of the `m` slots (offset and skip from two hashes of its
/// address) and claims its next free slot on each of its turns; a backend
/// gets turns in proportion to its weight. Returns, per slot, the index of
/// its backend. Same liveness rule as `alias_table`.
pub fn maglev_table(backends: &[BackendDef], m: usize) -> Vec<usize> {
    let live: Vec<usize> = if backends.iter().any(|b| b.weight > 0) {
        (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect()
    } else {
        (0..backends.len()).collect()
    };
    if live.is_empty() {
        return Vec::new();
    }
    let weight = |i: usize| u64::from(backends[i].weight.max(1));
    let wmax = live
        .iter()
        .map(|&i| weight(i))
        .max()
        .expect("live is not empty");
    let perm: Vec<(usize, usize)> = live
        .iter()
        .map(|&i| {
            let key = backends[i].addr.to_string();
            let offset = fnv1a(0xcbf2_9ce4_8422_2325, key.as_bytes()) as usize % m;
            let skip = fnv1a(0x8422_2325_cbf2_9ce4, key.as_bytes()) as usize % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut table = vec![usize::MAX; m];
    let mut filled = 0;
    while filled < m {
        for j in 0..live.len() {
            credit[j] += weight(live[j]);
            while credit[j] >= wmax && filled < m {
                credit[j] -= wmax;
                let (offset, skip) = perm[j];
                loop {
                    let c = (offset + next[j] * skip) % m;
                    next[j] += 1;
                    if table[c] == usize::MAX {
                        table[c] = live[j];
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    table
}

fn addr_of(b: &BackendDef) -> Addr {
    crate::addr::from_socket(b.addr)
}

/// The slot table a desired service should have, resolved to addresses.
pub fn desired_slots(svc: &DesiredService) -> Vec<ResolvedSlot> {
    if svc.policy == Policy::Consistent {
        let m = maglev_size(svc.backends.len());
        return maglev_table(&svc.backends, m)
            .into_iter()
            .map(|i| {
                let a = addr_of(&svc.backends[i]);
                (a, a, u32::MAX)
            })
            .collect();
    }
    let weights: Vec<u32> = svc.backends.iter().map(|b| b.weight).collect();
    alias_table(&weights)
        .into_iter()
        .map(|(b, a, t)| {
            let (b, a) = (addr_of(&svc.backends[b]), addr_of(&svc.backends[a]));
            // A column that always picks its own backend names it twice, so
            // equal inputs give equal tables whatever the rounding did.
            if t == u32::MAX { (b, b, t) } else { (b, a, t) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_table_matches_weights() {
        for weights in [
            vec![1, 1, 1],
            vec![1, 2, 3, 4],
            vec![0, 5, 0, 1],
            vec![65535, 1],
            vec![7],
            vec![0, 0],
        ] {
            let t = alias_table(&weights);
            let mut p = vec![0f64; weights.len()];
            for &(b, al, th) in &t {
                let q = f64::from(th) / 4294967296.0;
                p[b] += q / t.len() as f64;
                p[al] += (1.0 - q) / t.len() as f64;
            }
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let want = if total == 0 {
                    1.0 / weights.len() as f64
                } else {
                    f64::from(*w) / f64::from(total)
                };
                assert!((p[i] - want).abs() < 1e-6, "{weights:?}: {p:?}");
            }
        }
        assert!(alias_table(&[]).is_empty());
    }

    fn defs(addrs: &[(&str, u32)]) -> Vec<BackendDef> {
        addrs
            .iter()
            .map(|(a, w)| BackendDef {
                addr: a.parse().unwrap(),
                weight: *w,
            })
            .collect()
    }

    #[test]
    fn maglev_balances_by_weight_and_is_deterministic() {
        let b = defs(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 2),
            ("10.0.0.4:80", 0),
        ]);
        let m = maglev_size(b.len());
        assert_eq!(m, 1021);
        assert_eq!(
            maglev_size(9),
            maglev_size(10),
            "no remap for one backend less"
        );
        assert_eq!(maglev_size(11), 4093);
        assert_eq!(maglev_size(10_000), 65_521);
        let t = maglev_table(&b, m);
        assert_eq!(t, maglev_table(&b, m), "same input, same table");
        let share = |i| t.iter().filter(|&&x| x == i).count() as f64 / m as f64;
        assert!((share(0) - 0.25).abs() < 0.02, "{}", share(0));
        assert!((share(2) - 0.50).abs() < 0.02, "{}", share(2));
        assert_eq!(share(3), 0.0, "weight 0 gets nothing");
    }

    #[test]
    fn maglev_moves_about_one_nth_when_a_backend_goes() {
        let all: Vec<(String, u32)> = (1..=10).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
        let refs: Vec<(&str, u32)> = all.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        let before_defs = defs(&refs);
        let after_defs = defs(&refs[1..]);
        let m = maglev_size(10);
        assert_eq!(m, maglev_size(9));
        let before: Vec<_> = maglev_table(&before_defs, m)
            .iter()
            .map(|&i| before_defs[i].addr)
            .collect();
        let after: Vec<_> = maglev_table(&after_defs, m)
            .iter()
            .map(|&i| after_defs[i].addr)
            .collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / m as f64;
        // Ideal: exactly the removed backend's tenth.
        assert!((0.1..0.14).contains(&moved), "moved {moved}");
    }
}
