// comfy-bridge demo page: JSON parsing that keeps every digit of long integers (ComfyUI seeds).

// JSON whose integers beyond 2^53 (ComfyUI seeds go to 2^64-1) stay exact: they become decimal strings.
// Browsers that give a reviver the source text do it there; others get the long integers quoted first.
export function parseExact(text) {
  let sourced = false;
  const value = JSON.parse(text, (key, v, context) => {
    if (context && typeof context.source === "string") sourced = true;
    if (typeof v === "number" && Number.isInteger(v) && !Number.isSafeInteger(v) && context?.source) {
      return context.source;
    }
    return v;
  });
  return sourced || !/\d{16}/.test(text) ? value : JSON.parse(quoteLongIntegers(text));
}

function quoteLongIntegers(text) {
  // outside strings only: a long run of digits inside a string is left as it is
  let out = "";
  let inString = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (inString) {
      out += c;
      if (c === "\\") { out += text[i + 1]; i += 1; } else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
      out += c;
    } else if (/[-\d]/.test(c)) {
      const token = /^-?\d+(\.\d+)?([eE][-+]?\d+)?/.exec(text.slice(i))[0];
      const big = /^-?\d+$/.test(token) && !Number.isSafeInteger(Number(token));
      out += big ? `"${token}"` : token;
      i += token.length - 1;
    } else {
      out += c;
    }
  }
  return out;
}
