//! livemig control
