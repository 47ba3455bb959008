//! livemig lab
