//! fr-data: face-recognition data sources and the parallel batch loader.
//!
//! Sources: MXNet RecordIO (`.rec`/`.idx`, insightface and im2rec layouts), image folders,
//! verification `.bin` pairs; every training source implements [`FaceDataset`] and
//! [`BatchLoader`] turns it into normalised `(B, 3, H, W)` batches (optionally augmented,
//! [`AugmentConfig`]). [`pack_records`] writes image folders as insightface RecordIO.
//!
//! ```no_run
//! use std::sync::Arc;
//! use fr_data::{BatchLoader, LoaderConfig, RecordIoDataset};
//!
//! let train = Arc::new(RecordIoDataset::open("faces_emore")?);
//! let config = LoaderConfig { batch_size: 128, seed: 42, ..LoaderConfig::default() };
//! let loader = BatchLoader::new(train, config)?;
//! for epoch in 0..20 {
//!     for batch in loader.epoch(epoch) {
//!         let _batch = batch?; // images (128, 3, 112, 112) f32, labels (128,) u32
//!     }
//! }
//! let lfw = fr_data::load_bin("faces_emore/lfw.bin")?; // 6000 pairs, 12000 RGB images
//! # Ok::<(), fr_data::Error>(())
//! ```

pub mod align;
pub mod augment;
pub mod batch;
pub mod dataset;
pub mod error;
pub mod ijb;
pub mod image_folder;
pub mod in_memory;
pub mod loader;
mod pickle;
pub mod recordio;
pub mod recordio_writer;
pub mod sampler;
pub mod synthetic;
pub mod transform;
pub mod verification_bin;

pub use augment::AugmentConfig;
pub use batch::Batch;
pub use dataset::{FaceDataset, Quality};
pub use error::{Error, Result};
pub use image_folder::ImageFolder;
pub use in_memory::InMemoryDataset;
pub use loader::{BatchLoader, EpochIter, LoaderConfig, LoaderStats};
pub use recordio::{RecordIoDataset, RecordIoReader, RecordIoWriter, RecordLayout};
pub use recordio_writer::{pack_records, PackConfig, PackItem, PackSummary};
pub use transform::{images_to_chw, images_to_tensor, normalise_flip_into, normalise_into};
pub use verification_bin::{load_bin, VerificationSet};
