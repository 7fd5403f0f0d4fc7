// Waiting on host futures without blocking other tasks.
//
// `await wait(future)` parks the task; once every task has run as far as it
// can (the microtask queue is empty, so a 0 ms timer fires), one
// `runtime.poll` call waits for the first of all parked futures. Forks
// awaiting their passes therefore wait together, and the server batches
// their passes into the same engine steps.
import { poll } from 'pie:inferlet/runtime@0.2.0';
import { InferletError, drop } from './errors.js';

let parked = [];
let scheduled = false;

function ready(future) {
  const pollable = future.pollable();
  try {
    return pollable.ready();
  } finally {
    drop(pollable);
  }
}

function settle({ future, resolve, reject }) {
  try {
    resolve(future.get());
  } catch (error) {
    reject(InferletError.from(error));
  }
}

function pollParked() {
  scheduled = false;
  if (!parked.length) return;
  // `poll` consumes the pollables it is given: fresh ones every round.
  const done = new Set(poll(parked.map(({ future }) => future.pollable()), undefined));
  const waiting = parked;
  parked = [];
  waiting.forEach((entry, i) => (done.has(i) ? settle(entry) : parked.push(entry)));
  if (parked.length) schedule();
}

function schedule() {
  if (!scheduled) {
    scheduled = true;
    setTimeout(pollParked, 0);
  }
}

// The value of a host future's `get()` (an InferletError for its error), once
// it has resolved. The future is not dropped: the caller owns it.
export function wait(future) {
  return new Promise((resolve, reject) => {
    const entry = { future, resolve, reject };
    if (ready(future)) settle(entry);
    else {
      parked.push(entry);
      schedule();
    }
  });
}

// `wait`, then drop the future.
export async function take(future) {
  try {
    return await wait(future);
  } finally {
    drop(future);
  }
}
