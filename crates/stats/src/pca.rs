//! pca
