//! A second adversary of the migration core's fast paths, written independently of
//! `adversary8_fastpaths`: the pages setup collected and the pages stage took, kept
//! between stages (`Collect`); the pages stage's one pass over the destinations
//! (`take_dst`); the page cursor and finalize's batched give-back; the frame
//! pool's word-at-a-time frees. Each test tries to make them lose or corrupt bytes, leave
//! pages locked, free a page twice, leak, panic or hang.

#[path = "adversary9_fastpaths/frames.rs"]
mod frames;
#[path = "adversary9_fastpaths/large.rs"]
mod large;
#[path = "adversary9_fastpaths/race.rs"]
mod race;
#[path = "adversary9_fastpaths/words.rs"]
mod words;
