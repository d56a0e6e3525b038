//! tsne
