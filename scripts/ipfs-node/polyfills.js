// Loaded before anything from Helia: its dependencies call Promise.withResolvers, which
// arrived in Node 22. ES modules evaluate in import order, so node.js imports this first.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve
    let reject
    const promise = new this((res, rej) => {
      resolve = res
      reject = rej
    })
    return { promise, resolve, reject }
  }
}
