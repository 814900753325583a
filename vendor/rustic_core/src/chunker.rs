use std::io::Read;

mod fixed_size;
pub mod rabin;

use fixed_size::ChunkIter as FixedSizeChunkIter;
use rabin::ChunkIter as RabinChunkIter;
use rustic_cdc::Rabin64;

use crate::{
    RusticResult,
    repofile::{ConfigFile, configfile::Chunker as ChunkerKind},
};

/// The chunker a repository's config asks for, with its precomputed state.
///
/// shmback patch (docs/upstream/0005-chunker-tables-once.md): the Rabin tables (two 256-entry
/// tables, ~16,000 polynomial reductions) depend only on the repository's polynomial, so they are
/// built once here and cloned for each file. Building them in `ChunkIter::from_config` for every
/// file cost more than chunking and hashing a small file.
#[derive(Debug, Clone)]
pub(crate) enum Chunker {
    /// Content-defined chunking with the repository's polynomial.
    Rabin {
        /// The rolling hash with its tables, in its initial state.
        rabin: Box<Rabin64>,
        /// The average chunk size (a power of 2).
        size: usize,
        /// The minimum chunk size.
        min_size: usize,
        /// The maximum chunk size.
        max_size: usize,
    },
    /// Fixed-size chunks.
    FixedSize {
        /// The chunk size.
        size: usize,
    },
}

impl Chunker {
    /// Builds the chunker of `config` (the Rabin tables, when the config asks for Rabin).
    ///
    /// # Errors
    ///
    /// * If the config's polynomial or chunk sizes are invalid.
    pub(crate) fn from_config(config: &ConfigFile) -> RusticResult<Self> {
        Ok(match config.chunker() {
            ChunkerKind::Rabin => {
                let (size, min_size, max_size) = (
                    config.chunk_size(),
                    config.chunk_min_size(),
                    config.chunk_max_size(),
                );
                rabin::check_rabin_params(size, min_size, max_size)?;
                let poly = config.poly()?;
                Self::Rabin {
                    rabin: Box::new(Rabin64::new_with_polynom(6, &poly)),
                    size,
                    min_size,
                    max_size,
                }
            }
            ChunkerKind::FixedSize => Self::FixedSize {
                size: config.chunk_size(),
            },
        })
    }

    /// Starts chunking `reader`; `size_hint` should be an upper bound on its size.
    ///
    /// # Errors
    ///
    /// * If the chunk sizes are invalid.
    pub(crate) fn chunk<R: Read + Send>(
        &self,
        reader: R,
        size_hint: usize,
    ) -> RusticResult<ChunkIter<R>> {
        Ok(match self {
            Self::Rabin {
                rabin,
                size,
                min_size,
                max_size,
            } => ChunkIter::Rabin(Box::new(RabinChunkIter::new(
                (**rabin).clone(),
                *size,
                *min_size,
                *max_size,
                reader,
                size_hint,
            )?)),
            Self::FixedSize { size } => {
                ChunkIter::FixedSize(FixedSizeChunkIter::new(*size, reader, size_hint))
            }
        })
    }
}

/// `ChunkIter` is an iterator that chunks data.
pub(crate) enum ChunkIter<R: Read + Send> {
    Rabin(Box<RabinChunkIter<R>>),
    FixedSize(FixedSizeChunkIter<R>),
}

impl<R: Read + Send> Iterator for ChunkIter<R> {
    type Item = RusticResult<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Rabin(rabin) => rabin.next(),
            Self::FixedSize(fixed_size) => fixed_size.next(),
        }
    }
}
