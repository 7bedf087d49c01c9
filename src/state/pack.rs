//! Compression of idle customers' encodings with a dictionary trained on the store's own.
//!
//! An idle customer's postcard encoding (≈ 580 bytes at 32 events each, 68 % of the memory
//! per customer at a million) repeats what every other customer's holds: the same slot
//! layout, segment indexes, category and context strings, close timestamps. Each encoding
//! alone is too short for a compressor to find that; against a dictionary trained on a
//! few thousand of them, zstd finds it (the memory bench: 35–42 % fewer bytes). The
//! sweeper trains the dictionary from the first idle encodings; since those are young
//! states (a fresh process's first customers, with a few events each), it trains a second
//! one once the states it encodes have grown by half, and repacks the customers the first
//! one packed ([`Dictionaries`]). Dictionaries are never written anywhere — the changelog
//! keeps plain encodings, so nothing outside the process depends on them.
//!
//! Frames carry neither zstd's magic number nor the dictionary's id (8 bytes of every
//! entry): only this process reads them, always with its one dictionary.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use zstd::zstd_safe::{self, CCtx, CDict, CParameter, DCtx, DDict, DParameter, FrameFormat};

/// The dictionary's size. The memory bench at 100,000 customers, against 32 KiB: 16 KiB
/// packed 1 % larger; 64 KiB 2.6 % smaller (idle encodings 188–190 bytes against 193–195,
/// two runs each), for 32 KiB more held once per process.
const DICTIONARY_BYTES: usize = 64 * 1024;

/// zstd's level for the frames (the memory bench at 100,000 customers: level 9 packed 2 %
/// smaller and took 45 % longer; level 1, 2 % larger).
const LEVEL: i32 = 3;

/// Fewer samples than this train no useful dictionary.
pub const MIN_SAMPLES: usize = 1_000;

/// Bounds a training's time and memory (8,000 samples of ≈ 600 bytes: ≈ 5 MB).
pub const MAX_SAMPLES: usize = 8_000;

/// How much larger (in mean plain encoding length) the states a sweep encodes must have
/// grown since the first dictionary was trained for a second one to be trained on them.
/// The memory bench at 1,000,000 customers: 464 bytes a customer with 1.5, 473 with 1.25,
/// 506 with no second dictionary.
const RETRAIN_GROWTH: f64 = 1.5;

thread_local! {
    /// Each thread's compression context (they are expensive to create: ~100 KiB).
    static COMPRESSOR: RefCell<CCtx<'static>> = RefCell::new(CCtx::create());
    /// Each thread's decompression context, and a buffer for what it decompresses.
    static DECOMPRESSOR: RefCell<(DCtx<'static>, Vec<u8>)> =
        RefCell::new((DCtx::create(), Vec::new()));
}

/// A trained dictionary, prepared for both directions.
pub struct Packer {
    compress: CDict<'static>,
    decompress: DDict<'static>,
}

/// A store's dictionaries: up to two, numbered 1 and 2 (0 means plain, in an idle
/// customer's header). Packing uses the latest; unpacking the one an entry names.
#[derive(Default)]
pub struct Dictionaries {
    trained: [OnceLock<Packer>; 2],
    /// The mean length of the samples the first was trained on.
    first_mean: AtomicUsize,
}

impl Dictionaries {
    /// Dictionary `number` (1 or 2), if trained.
    pub fn get(&self, number: u8) -> Option<&Packer> {
        self.trained.get(usize::from(number).checked_sub(1)?)?.get()
    }

    /// The latest dictionary and its number, if any is trained.
    pub fn latest(&self) -> Option<(u8, &Packer)> {
        (1..=2).rev().find_map(|n| Some((n, self.get(n)?)))
    }

    /// Whether a sweep should collect samples: a dictionary is still to be trained.
    pub fn wants_samples(&self) -> bool {
        self.get(2).is_none()
    }

    /// Trains the first dictionary on `samples` (plain encodings), or the second once
    /// their mean length has grown by [`RETRAIN_GROWTH`] since the first. Returns the
    /// number of the one trained, if any.
    pub fn learn(&self, samples: &[Vec<u8>]) -> Option<u8> {
        if samples.len() < MIN_SAMPLES {
            return None;
        }
        let mean = samples.iter().map(Vec::len).sum::<usize>() / samples.len();
        let number = match (self.get(1), self.get(2)) {
            (None, _) => 1,
            (Some(_), None)
                if mean as f64
                    >= self.first_mean.load(Ordering::Relaxed) as f64 * RETRAIN_GROWTH =>
            {
                2
            }
            _ => return None,
        };
        let packer = Packer::train(samples)?;
        if number == 1 {
            self.first_mean.store(mean, Ordering::Relaxed);
        }
        let _ = self.trained[usize::from(number) - 1].set(packer);
        Some(number)
    }
}

/// Why a packed entry could not be unpacked (only a bug can cause it: entries are this
/// process's own).
#[derive(Debug, thiserror::Error)]
#[error("a packed state does not decompress: {0}")]
pub struct UnpackError(String);

impl Packer {
    /// Trains a dictionary on `samples` (idle encodings); `None` when zstd finds nothing
    /// to learn (too few or too uniform samples).
    pub fn train(samples: &[Vec<u8>]) -> Option<Packer> {
        if samples.len() < MIN_SAMPLES {
            return None;
        }
        let dictionary = zstd::dict::from_samples(samples, DICTIONARY_BYTES).ok()?;
        Some(Packer {
            compress: CDict::try_create(&dictionary, LEVEL)?,
            decompress: DDict::try_create(&dictionary)?,
        })
    }

    /// `raw` compressed, after `header` (written as it is) and `raw`'s length; `None` if
    /// zstd refuses (it has no reason to: the caller then keeps `raw` as it is).
    pub fn pack(&self, header: &[u8], raw: &[u8]) -> Option<Box<[u8]>> {
        let length = u32::try_from(raw.len()).ok()?;
        COMPRESSOR.with_borrow_mut(|context| {
            let mut frame = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
            let written = start_compression(context, &self.compress)
                .and_then(|()| context.compress2(&mut frame, raw));
            // Forget the dictionary, so no context outlives a reference to it.
            let _ = context.reset(zstd_safe::ResetDirective::SessionAndParameters);
            written.ok()?;
            let mut packed = Vec::with_capacity(header.len() + 5 + frame.len());
            packed.extend_from_slice(header);
            let mut packed = postcard::to_extend(&length, packed).ok()?;
            packed.extend_from_slice(&frame);
            Some(packed.into_boxed_slice())
        })
    }

    /// Calls `read` with the bytes `packed` (after its `header_len`-byte header) holds.
    pub fn unpack<R>(
        &self,
        packed: &[u8],
        header_len: usize,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, UnpackError> {
        let (length, frame) = postcard::take_from_bytes::<u32>(&packed[header_len..])
            .map_err(|err| UnpackError(format!("its length: {err}")))?;
        DECOMPRESSOR.with_borrow_mut(|(context, buffer)| {
            buffer.clear();
            buffer.reserve(length as usize);
            let result = start_decompression(context, &self.decompress)
                .and_then(|()| context.decompress(buffer, frame));
            let _ = context.reset(zstd_safe::ResetDirective::SessionAndParameters);
            match result {
                Ok(written) if written == length as usize => Ok(read(buffer)),
                Ok(written) => Err(UnpackError(format!("{written} bytes, {length} expected"))),
                Err(code) => Err(UnpackError(describe(code))),
            }
        })
    }
}

/// Sets up `context` for one frame with `dictionary`.
fn start_compression(
    context: &mut CCtx<'static>,
    dictionary: &CDict<'static>,
) -> Result<(), zstd_safe::ErrorCode> {
    context.set_parameter(CParameter::Format(FrameFormat::Magicless))?;
    context.set_parameter(CParameter::DictIdFlag(false))?;
    context.set_parameter(CParameter::ChecksumFlag(false))?;
    context.ref_cdict(dictionary)?;
    Ok(())
}

/// Sets up `context` for one frame with `dictionary`.
fn start_decompression(
    context: &mut DCtx<'static>,
    dictionary: &DDict<'static>,
) -> Result<(), zstd_safe::ErrorCode> {
    context.set_parameter(DParameter::Format(FrameFormat::Magicless))?;
    context.ref_ddict(dictionary)?;
    Ok(())
}

/// zstd's name for an error code.
fn describe(code: zstd_safe::ErrorCode) -> String {
    zstd_safe::get_error_name(code).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodings alike in layout, different in values, like customers' states.
    fn samples(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| {
                format!(
                    "customer-state v3 cart:[p-{} x{}] session:s-{} context:mobile/DE/Berlin \
                     categories:shoes={},running={} seen:{}",
                    i % 97,
                    i % 5,
                    i * 7,
                    i % 13,
                    i % 11,
                    1_700_000_000_000u64 + i as u64 * 1_000
                )
                .into_bytes()
            })
            .collect()
    }

    #[test]
    fn a_packed_state_unpacks_to_its_bytes_and_is_smaller() {
        let samples = samples(2_000);
        let packer = Packer::train(&samples).expect("trains");
        for raw in samples.iter().step_by(97) {
            let packed = packer.pack(&[1, 2, 3, 4], raw).unwrap();
            assert_eq!(&packed[..4], &[1, 2, 3, 4]);
            assert!(
                packed.len() < raw.len() / 2,
                "{} of {}",
                packed.len(),
                raw.len()
            );
            let unpacked = packer.unpack(&packed, 4, <[u8]>::to_vec).unwrap();
            assert_eq!(&unpacked, raw);
        }
        // Bytes it never saw still round-trip.
        let other = vec![0xAB; 3_000];
        let packed = packer.pack(&[], &other).unwrap();
        assert_eq!(packer.unpack(&packed, 0, <[u8]>::to_vec).unwrap(), other);
    }

    #[test]
    fn too_few_samples_train_nothing() {
        assert!(Packer::train(&samples(MIN_SAMPLES - 1)).is_none());
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let packer = Packer::train(&samples(2_000)).unwrap();
        let mut packed = packer
            .pack(&[], b"some state bytes, some state bytes")
            .unwrap()
            .into_vec();
        let end = packed.len() - 1;
        packed[end] ^= 0xFF;
        packed.truncate(end - 2);
        assert!(packer.unpack(&packed, 0, |_| ()).is_err());
        assert!(packer.unpack(&[0xFF, 0xFF], 0, |_| ()).is_err());
    }
}
