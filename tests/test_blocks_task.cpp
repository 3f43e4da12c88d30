#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "tasks/blocks_task.h"
#include "util/error.h"

using mta::InputError;
using mta::tasks::BlocksExample;
using mta::tasks::BlocksTask;
using mta::tasks::BlocksTaskConfig;
using mta::tasks::BlocksVariant;
using mta::tasks::Stream;

namespace {

const BlocksVariant kVariants[] = {BlocksVariant::All, BlocksVariant::First, BlocksVariant::Last};

// An example's text taken apart again.
struct Parsed {
  int pad = 0;
  std::vector<std::string> blocks;
  std::string query, label;
};

// Parses "___abc.def#ea" + label; label_len says where the query ends.
Parsed parse(const std::string& text, int label_len) {
  Parsed p;
  while (p.pad < static_cast<int>(text.size()) && text[p.pad] == '_') ++p.pad;
  const size_t hash = text.find('#');
  EXPECT_NE(hash, std::string::npos) << text;
  EXPECT_EQ(text.find('#', hash + 1), std::string::npos) << "more than one '#': " << text;
  const std::string body = text.substr(static_cast<size_t>(p.pad), hash - p.pad);
  size_t start = 0;
  while (true) {
    const size_t dot = body.find('.', start);
    p.blocks.push_back(body.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  const std::string tail = text.substr(hash + 1);
  EXPECT_GE(static_cast<int>(tail.size()), label_len) << text;
  p.query = tail.substr(0, tail.size() - label_len);
  p.label = tail.substr(tail.size() - label_len);
  return p;
}

bool contains_all(const std::string& block, const std::string& query) {
  for (char q : query)
    if (block.find(q) == std::string::npos) return false;
  return true;
}

bool all_letters_distinct(const std::string& s) {
  std::set<char> seen;
  for (char c : s) {
    if (c < 'a' || c > 'z' || !seen.insert(c).second) return false;
  }
  return true;
}

// Every property of one example; returns the target block's position.
int check_example(const BlocksTask& task, const BlocksExample& ex) {
  const BlocksTaskConfig& cfg = task.config();
  const int label_len = task.label_len();
  EXPECT_EQ(static_cast<int>(ex.tokens.size()), 1 + cfg.length);
  EXPECT_EQ(static_cast<int>(ex.tokens.size()), task.seq_tokens());
  EXPECT_EQ(static_cast<int>(ex.text.size()), cfg.length);
  EXPECT_EQ(ex.tokens.at(0), mta::tasks::kBos);
  EXPECT_EQ(ex.label_len, label_len);
  EXPECT_EQ(ex.label_begin, 1 + cfg.length - label_len);

  // Tokens and text agree, token ids are in the vocabulary, BOS only first, PAD only as a left prefix.
  bool in_padding = true;
  for (size_t i = 1; i < ex.tokens.size(); ++i) {
    const int32_t t = ex.tokens[i];
    EXPECT_GE(t, 0);
    EXPECT_LT(t, mta::tasks::kBlocksVocab);
    EXPECT_NE(t, mta::tasks::kBos) << "BOS at " << i;
    EXPECT_EQ(mta::tasks::token_char(t), ex.text[i - 1]) << "token " << i;
    if (t != mta::tasks::kPad) in_padding = false;
    else EXPECT_TRUE(in_padding) << "PAD after the padding at " << i << ": " << ex.text;
  }

  const Parsed p = parse(ex.text, label_len);
  EXPECT_EQ(p.pad + (cfg.n + 1) * task.num_blocks() + cfg.l + label_len, cfg.length) << ex.text;
  EXPECT_EQ(static_cast<int>(p.blocks.size()), task.num_blocks()) << ex.text;
  std::set<std::string> distinct;
  int target = -1, holders = 0;
  for (size_t b = 0; b < p.blocks.size(); ++b) {
    const std::string& blk = p.blocks[b];
    EXPECT_EQ(static_cast<int>(blk.size()), cfg.n) << "block " << b << " of " << ex.text;
    EXPECT_TRUE(all_letters_distinct(blk)) << "block " << blk;
    distinct.insert(blk);
    if (contains_all(blk, p.query)) {
      ++holders;
      target = static_cast<int>(b);
    }
  }
  EXPECT_EQ(distinct.size(), p.blocks.size()) << "repeated block in " << ex.text;
  EXPECT_EQ(static_cast<int>(p.query.size()), cfg.l) << ex.text;
  EXPECT_TRUE(all_letters_distinct(p.query)) << "query " << p.query;
  EXPECT_EQ(holders, 1) << "blocks containing all query letters in " << ex.text;
  if (holders != 1 || target < 0) return -1;
  const std::string& tb = p.blocks[static_cast<size_t>(target)];
  switch (cfg.variant) {
    case BlocksVariant::All: EXPECT_EQ(p.label, tb) << ex.text; break;
    case BlocksVariant::First: EXPECT_EQ(p.label, tb.substr(0, 1)) << ex.text; break;
    case BlocksVariant::Last: EXPECT_EQ(p.label, tb.substr(tb.size() - 1)) << ex.text; break;
  }
  // The label tokens are the label letters.
  for (int i = 0; i < label_len; ++i)
    EXPECT_EQ(ex.tokens[static_cast<size_t>(ex.label_begin + i)], mta::tasks::kFirstLetter + (p.label[i] - 'a'));
  return target;
}

std::string refusal(const BlocksTaskConfig& cfg) {
  try {
    BlocksTask t(cfg);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

BlocksTaskConfig make(int n, int l, BlocksVariant v = BlocksVariant::All, int length = 319, int blocks = 0) {
  BlocksTaskConfig c;
  c.n = n;
  c.l = l;
  c.variant = v;
  c.length = length;
  c.blocks = blocks;
  return c;
}

}  // namespace

TEST(BlocksTask, ExamplesAreWellFormed) {
  const std::pair<int, int> nls[] = {{5, 2}, {8, 2}, {3, 2}, {4, 3}};
  for (auto [n, l] : nls) {
    for (BlocksVariant v : kVariants) {
      BlocksTask task(make(n, l, v));
      SCOPED_TRACE("n=" + std::to_string(n) + " l=" + std::to_string(l) + " " + mta::tasks::variant_name(v));
      // The most blocks that fit, and no more.
      const int label_len = v == BlocksVariant::All ? n : 1;
      EXPECT_LE((n + 1) * task.num_blocks() + l + label_len, 319);
      EXPECT_GT((n + 1) * (task.num_blocks() + 1) + l + label_len, 319);
      for (uint64_t i = 0; i < 200; ++i) {
        check_example(task, task.example(7, Stream::Train, i));
        check_example(task, task.example(7, Stream::Test, i));
        if (HasFailure()) return;
      }
    }
  }
}

TEST(BlocksTask, DefaultConfigFillsTheLength) {
  BlocksTask task{BlocksTaskConfig{}};
  EXPECT_EQ(task.num_blocks(), 52);
  EXPECT_EQ(task.label_len(), 5);
  EXPECT_EQ(task.seq_tokens(), 320);
  for (uint64_t i = 0; i < 50; ++i) {
    const BlocksExample ex = task.example(1, Stream::Train, i);
    EXPECT_EQ(ex.tokens.size(), 320u);
    EXPECT_EQ(ex.text.find('_'), std::string::npos) << ex.text;
    EXPECT_EQ(ex.label_begin, 315);
    EXPECT_EQ(ex.text[311], '#') << ex.text;
    check_example(task, ex);
  }
}

TEST(BlocksTask, ExplicitBlocksArePadded) {
  BlocksTask task(make(5, 2, BlocksVariant::Last, 319, 10));
  EXPECT_EQ(task.num_blocks(), 10);
  const BlocksExample ex = task.example(3, Stream::Test, 5);
  const int used = 6 * 10 + 2 + 1;
  EXPECT_EQ(ex.text.substr(0, 319 - used), std::string(319 - used, '_'));
  EXPECT_EQ(ex.tokens[1], mta::tasks::kPad);
  EXPECT_NE(ex.tokens[1 + 319 - used], mta::tasks::kPad);
  EXPECT_EQ(ex.label_begin, 319);
  check_example(task, ex);

  // The exact fit is accepted, one more block is not.
  BlocksTask exact(make(5, 2, BlocksVariant::All, 6 * 10 + 2 + 5, 10));
  check_example(exact, exact.example(3, Stream::Train, 0));
  EXPECT_NE(refusal(make(5, 2, BlocksVariant::All, 6 * 10 + 2 + 5, 11)).find("task.blocks"), std::string::npos);
}

TEST(BlocksTask, TightAlphabetsStillTerminate) {
  // One letter per block: only 25 letters avoid the query letter, so 26 blocks use every letter.
  BlocksTask one(make(1, 1, BlocksVariant::All, 319, 26));
  for (uint64_t i = 0; i < 50; ++i) {
    const BlocksExample ex = one.example(5, Stream::Train, i);
    check_example(one, ex);
    std::set<std::string> letters;
    for (const std::string& b : parse(ex.text, 1).blocks) letters.insert(b);
    EXPECT_EQ(letters.size(), 26u) << ex.text;
  }
  EXPECT_NE(refusal(make(1, 1, BlocksVariant::All, 319, 27)).find("task.blocks"), std::string::npos);
  // Blocks of 25 letters where every letter is a query letter: other blocks must drop one of them.
  BlocksTask wide(make(25, 25, BlocksVariant::First, 319, 5));
  for (uint64_t i = 0; i < 20; ++i) check_example(wide, wide.example(5, Stream::Test, i));
}

TEST(BlocksTask, Deterministic) {
  BlocksTask task{BlocksTaskConfig{}};
  BlocksTask again{BlocksTaskConfig{}};
  for (uint64_t i = 0; i < 20; ++i) {
    const BlocksExample a = task.example(42, Stream::Train, i);
    const BlocksExample b = again.example(42, Stream::Train, i);
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_EQ(a.text, b.text);
    EXPECT_NE(a.tokens, task.example(42, Stream::Test, i).tokens) << "train and test streams coincide";
    EXPECT_NE(a.tokens, task.example(43, Stream::Train, i).tokens) << "seeds 42 and 43 coincide";
    EXPECT_NE(a.tokens, task.example(42, Stream::Train, i + 1).tokens) << "indices coincide";
  }
  // Swapping seed and index gives a different example.
  EXPECT_NE(task.example(3, Stream::Train, 9).tokens, task.example(9, Stream::Train, 3).tokens);
  // Order of calls does not matter: an example is a pure function of its arguments.
  const auto late = task.example(42, Stream::Train, 1000).tokens;
  BlocksTask fresh{BlocksTaskConfig{}};
  EXPECT_EQ(fresh.example(42, Stream::Train, 1000).tokens, late);
}

TEST(BlocksTask, GoldenExampleIsStable) {
  // Pins the generator: a change to the sampling changes every dataset, so it must be deliberate. Both
  // strings were also produced by an independent Python re-implementation (mt19937_64 written out,
  // splitmix64 seeding, rejection draws), which matched this implementation exactly.
  BlocksTask small(make(3, 2, BlocksVariant::All, 30, 0));
  const BlocksExample a = small.example(0, Stream::Train, 0);
  check_example(small, a);
  EXPECT_EQ(a.text, "_pqi.gcd.ncj.fwi.qka.mea#cggcd");

  BlocksTask paper{BlocksTaskConfig{}};
  const BlocksExample b = paper.example(1, Stream::Test, 2);
  check_example(paper, b);
  EXPECT_EQ(b.text,
            "aqrdz.xhmca.bdket.lsrkt.xlnfj.fwdli.udhpx.tjqsg.mkazp.hunqo.cdsuo.wonrs.hamgi.hzjpc.vlghk."
            "otbfe.uzwel.ymdga.atqei.ryonu.qadje.ynpct.cpwmt.ibtav.jatvh.hqesm.vqmrx.wyikn.lhxvq.oanyu."
            "narjc.vcfiu.weuir.viodk.uansy.uwgmn.dhtsf.egdou.qdbxt.jtmab.buipm.pkadl.hotiu.fntbc.aotrs."
            "vqhie.qexru.gehkv.oswhe.frgyc.xmdkn.wqjgf#wzuzwel");
}

TEST(BlocksTask, DistributionIsSpread) {
  for (BlocksVariant v : kVariants) {
    BlocksTask task(make(5, 2, v));
    std::set<int> positions;
    std::set<char> first_label_letters;
    std::set<char> first_query_letters;
    int query_in_block_order = 0, query_reversed = 0;
    for (uint64_t i = 0; i < 2000; ++i) {
      const BlocksExample ex = task.example(11, Stream::Train, i);
      const int pos = check_example(task, ex);
      positions.insert(pos);
      if (pos >= 0) {
        const Parsed p = parse(ex.text, task.label_len());
        const std::string& tb = p.blocks[static_cast<size_t>(pos)];
        (tb.find(p.query[0]) < tb.find(p.query[1]) ? query_in_block_order : query_reversed)++;
      }
      first_label_letters.insert(ex.text[static_cast<size_t>(ex.label_begin - 1)]);
      first_query_letters.insert(ex.text[static_cast<size_t>(ex.label_begin - 1 - 2)]);
      if (HasFailure()) return;
    }
    EXPECT_TRUE(positions.count(0)) << "target never first";
    EXPECT_TRUE(positions.count(task.num_blocks() - 1)) << "target never last";
    EXPECT_GE(positions.size(), 45u);
    EXPECT_GE(first_label_letters.size(), 20u);
    EXPECT_GE(first_query_letters.size(), 20u);
    // Query letters come in random order, not in the target block's order.
    EXPECT_GT(query_in_block_order, 800);
    EXPECT_GT(query_reversed, 800);
  }
}

TEST(BlocksTask, RefusesBadConfigs) {
  auto refused = [](const BlocksTaskConfig& c, const std::string& field) {
    const std::string msg = refusal(c);
    EXPECT_EQ(msg.rfind(field + ":", 0), 0u) << "expected a refusal naming " << field << ", got \"" << msg << "\"";
  };
  refused(make(0, 1), "task.n");
  refused(make(30, 2), "task.n");
  EXPECT_EQ(refusal(make(30, 2)), "task.n: must be in [1, 26] (got 30)");
  refused(make(26, 2), "task.n");
  refused(make(5, 0), "task.l");
  refused(make(5, 6), "task.l");
  // 2 blocks need 5 + '.' + 5 + '#' + 2 + 5 = 19 characters.
  refused(make(5, 2, BlocksVariant::All, 18), "task.length");
  EXPECT_EQ(refusal(make(5, 2, BlocksVariant::All, 19)), "");
  refused(make(5, 2, BlocksVariant::All, 1 << 30), "task.length");
  refused(make(5, 2, BlocksVariant::All, 319, 1), "task.blocks");
  refused(make(5, 2, BlocksVariant::All, 319, -3), "task.blocks");
  refused(make(5, 2, BlocksVariant::All, 319, 53), "task.blocks");
  EXPECT_EQ(refusal(make(5, 2, BlocksVariant::All, 319, 52)), "");
  refused(make(1, 1), "task.blocks");  // 159 one-letter blocks cannot be distinct
  refused(make(5, 2, static_cast<BlocksVariant>(7)), "task.variant");
  // Sound edges are accepted.
  EXPECT_EQ(refusal(make(25, 1, BlocksVariant::Last, 319, 0)), "");
  EXPECT_EQ(refusal(make(1, 1, BlocksVariant::All, 319, 26)), "");
}

TEST(BlocksTask, VariantNamesAndTokenChars) {
  for (BlocksVariant v : kVariants) EXPECT_EQ(mta::tasks::parse_variant(mta::tasks::variant_name(v)), v);
  EXPECT_EQ(mta::tasks::variant_name(BlocksVariant::First), "first");
  try {
    mta::tasks::parse_variant("x");
    ADD_FAILURE() << "parse_variant(\"x\") accepted";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()), "task.variant: must be \"all\", \"first\" or \"last\" (got \"x\")");
  }
  EXPECT_THROW(mta::tasks::parse_variant("All"), InputError);
  EXPECT_EQ(mta::tasks::token_char(mta::tasks::kPad), '_');
  EXPECT_EQ(mta::tasks::token_char(mta::tasks::kBos), '^');
  EXPECT_EQ(mta::tasks::token_char(mta::tasks::kDot), '.');
  EXPECT_EQ(mta::tasks::token_char(mta::tasks::kHash), '#');
  EXPECT_EQ(mta::tasks::token_char(mta::tasks::kFirstLetter), 'a');
  EXPECT_EQ(mta::tasks::token_char(mta::tasks::kFirstLetter + 25), 'z');
  EXPECT_EQ(mta::tasks::kFirstLetter + 26, mta::tasks::kBlocksVocab);
}
