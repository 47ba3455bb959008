//! livemig wire
