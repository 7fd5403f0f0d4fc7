// The SDK's error: what the server returned, a code to branch on and a message.

export class InferletError extends Error {
  // `code` is the contract's error-code name: "invalid-argument", "not-found",
  // "out-of-memory", "unsupported", "closed", "internal" or "already-exists".
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'InferletError';
    this.code = code;
    this.detail = message;
  }

  // From a binding's ComponentError (its `payload` is the `error` record).
  static from(error) {
    const payload = error?.payload;
    if (payload && typeof payload.code === 'string') return new InferletError(payload.code, payload.message);
    return error;
  }
}

// Runs a binding call; a `result` error becomes an InferletError.
export function check(thunk) {
  try {
    return thunk();
  } catch (error) {
    throw InferletError.from(error);
  }
}

// Releases a host resource now instead of whenever the garbage collector gets to it.
export function drop(handle) {
  handle?.[Symbol.dispose]?.();
}
