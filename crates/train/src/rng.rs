//! A small seedable generator (SplitMix64) whose whole state is one `u64`, so checkpoints can
//! store it and a resumed run draws exactly the numbers the uninterrupted run would have.

use safetune_data::util::{below_mod, shuffle_with, splitmix64_next, unit_f32, GOLDEN_GAMMA};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainRng {
    pub state: u64,
}

impl TrainRng {
    pub fn new(seed: u64) -> TrainRng {
        TrainRng {
            state: seed ^ 0x2545_F491_4F6C_DD1D,
        }
    }

    /// A generator for a named purpose, independent of the others drawn from the same seed.
    pub fn derive(seed: u64, purpose: u64) -> TrainRng {
        let mut r = TrainRng::new(seed.wrapping_mul(GOLDEN_GAMMA) ^ purpose);
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        splitmix64_next(&mut self.state)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        unit_f32(self.next_u64())
    }

    /// Uniform in [0, n), by remainder (`n = 0` gives 0).
    pub fn below(&mut self, n: usize) -> usize {
        below_mod(self.next_u64(), n)
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        shuffle_with(xs, |n| self.below(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Training draws (data order, dropout, sampling) must never move: checkpoints and resumed
    /// runs depend on them.
    #[test]
    fn stream_is_pinned() {
        type Case = (
            u64,
            [u64; 3],
            [u64; 3],
            [f32; 3],
            [usize; 8],
            [u32; 10],
            u64,
        );
        let expect: [Case; 2] = [
            (
                0,
                [
                    13898507668257350876,
                    9874931141998527612,
                    12936763147494389601,
                ],
                [
                    17026326829636273255,
                    8082656400052027859,
                    13519269159303774876,
                ],
                [0.19823527, 0.08722395, 0.4095968],
                [0, 0, 2, 1, 1, 93, 185, 684876574682],
                [3, 6, 5, 0, 2, 4, 8, 1, 9, 7],
                11002531035172985033,
            ),
            (
                42,
                [
                    8652583828347440663,
                    11023358202982032988,
                    10536612245469036169,
                ],
                [
                    4207665747771243964,
                    15005884443983166274,
                    11232300280191440000,
                ],
                [0.9854324, 0.102535486, 0.85683125],
                [0, 0, 2, 1, 8, 60, 67, 1089682061512],
                [9, 8, 1, 0, 5, 6, 4, 2, 7, 3],
                4883854853737709531,
            ),
        ];
        for (seed, plain, derived, units, below, shuffled, state) in expect {
            let mut r = TrainRng::new(seed);
            let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
            assert_eq!(got, plain);
            let mut d = TrainRng::derive(seed, 0xE7A1);
            let got: Vec<u64> = (0..3).map(|_| d.next_u64()).collect();
            assert_eq!(got, derived);
            let got: Vec<f32> = (0..3).map(|_| d.next_f32()).collect();
            assert_eq!(got, units);
            let got: Vec<usize> = [1, 2, 3, 7, 10, 100, 1000, 1 << 40]
                .iter()
                .map(|&n| d.below(n))
                .collect();
            assert_eq!(got, below);
            assert_eq!(d.below(0), 0);
            let mut xs: Vec<u32> = (0..10).collect();
            d.shuffle(&mut xs);
            assert_eq!(xs, shuffled);
            assert_eq!(d.state, state);
        }
    }
}
