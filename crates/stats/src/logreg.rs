//! logreg
