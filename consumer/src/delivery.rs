//! The consumer's sessions with the broker: jobs taken only when there is room for them,
//! copies of dead letters recorded, channels watched, and the connection made again when it is
//! lost, while the jobs in hand run on (their leases hold them, not the connection).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use quarry_core::job::{Job, Outcome};
use quarry_infra::Config;
use quarry_infra::queue::{self, Broker, Publisher};
use quarry_infra::store::JobState;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::lease::Lease;
use crate::{Taken, Worker};

/// The jobs a consumer has in hand, across sessions with the broker: each runs as a task of its
/// own, holding one of `room`'s permits (twice the slots: while one job holds a slot, another is
/// fetched, prepared or recorded).
pub(crate) struct Hand {
    tasks: tokio::task::JoinSet<()>,
    room: Arc<tokio::sync::Semaphore>,
}

impl Hand {
    pub(crate) fn new(concurrency: u16) -> Hand {
        Hand {
            tasks: tokio::task::JoinSet::new(),
            room: Arc::new(tokio::sync::Semaphore::new(usize::from(
                concurrency.saturating_mul(2),
            ))),
        }
    }

    /// Forgets the tasks that ended.
    fn reap(&mut self) {
        while let Some(ended) = self.tasks.try_join_next() {
            Hand::forget(ended);
        }
    }

    fn forget(ended: Result<(), tokio::task::JoinError>) {
        if let Err(err) = ended
            && err.is_panic()
        {
            tracing::error!(%err, "a job's task panicked; its lease lapses and it is published again");
        }
    }

    /// Waits until every job in hand has ended.
    async fn finish(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stopped without a connection to the broker: what is in hand has its grace period, and
    /// what cannot publish what it needs to lets its lease lapse.
    pub(crate) async fn finish_offline(&mut self, worker: &Worker, grace: Duration) {
        if self.tasks.is_empty() {
            return;
        }
        if tokio::time::timeout(grace, self.finish()).await.is_err() {
            self.tasks.abort_all();
            self.finish().await;
            worker.leases.lapse_all().await;
        }
    }
}

/// How often a consumer that holds back from taking a job it could not start yet looks at the
/// queue again.
const AHEAD_RECHECK: Duration = Duration::from_millis(500);

/// Whether to take a job that no slot of this consumer is free for (it is prepared meanwhile,
/// then waits), the queue holding `queued` jobs at the last look: only if every other slot of
/// the fleet (`fleet_slots` in all, `own_slots` of them this consumer's) could take one and one
/// would still be left. Otherwise, at the end of a run, the job waits for this consumer's slot
/// while another consumer has nothing left to take and idles.
fn may_take_ahead(queued: Option<u32>, fleet_slots: u32, own_slots: u16) -> bool {
    queued.is_none_or(|queued| queued > fleet_slots.saturating_sub(u32::from(own_slots)))
}

/// How long a consumer with a free slot waits on an empty queue before it says it is idle.
const IDLE_AFTER: Duration = Duration::from_millis(300);

impl Worker {
    /// The jobs the work queue held at the last look, if any.
    fn queued(&self) -> Option<u32> {
        let queued = self.queued.load(std::sync::atomic::Ordering::Relaxed);
        (queued != u32::MAX).then_some(queued)
    }

    fn saw_queue(&self, queued: u32) {
        self.queued.store(
            queued.min(u32::MAX - 1),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    async fn look_at_queue(&self, broker: &Broker) {
        match broker.ready_messages(&broker.topology().jobs).await {
            Ok(ready) => self.saw_queue(ready),
            Err(err) => tracing::debug!(error = %format!("{err:#}"), "cannot look at the queue"),
        }
    }

    /// Whether to take a job no slot of this consumer is free for (`may_take_ahead`).
    fn may_take_ahead(&self) -> bool {
        may_take_ahead(
            self.queued(),
            self.fleet_slots.load(std::sync::atomic::Ordering::Relaxed),
            self.concurrency,
        )
    }

    /// Returns once a job waiting for a slot here should go back to the queue: another
    /// consumer of the fleet has a free slot and found the queue empty (it said so in the fleet
    /// table). Handed back, the job starts there at once, at the price of being prepared
    /// again, rather than after this consumer's running job. Asked only while the queue, at
    /// this consumer's last look, held too few jobs for the rest of the fleet's slots (before
    /// that, no consumer is idle). Cancel-safe.
    pub(crate) async fn give_way(&self) {
        loop {
            tokio::time::sleep(AHEAD_RECHECK).await;
            if self.may_take_ahead() {
                continue;
            }
            match self.store.idle_elsewhere(self.identity.id).await {
                Ok(true) => {
                    // It will be in the queue: another job waiting here judges with it counted,
                    // and this consumer does not take it back for want of a heartbeat that
                    // counted the idle one's slot.
                    self.saw_queue(self.queued().unwrap_or(0).saturating_add(1));
                    self.fleet_slots.fetch_max(
                        u32::from(self.concurrency) + 1,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    return;
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::debug!(error = %format!("{err:#}"), "cannot ask whether another consumer is idle")
                }
            }
        }
    }
}

/// Consumes from one broker connection until it fails or `shutdown` is cancelled. The jobs it
/// took go on in `hand` when the session ends (their leases hold them, not the connection); on
/// shutdown, they are given `grace` to finish while the connection is still there to publish
/// what they need to, and those still running after it are handed back.
pub(crate) async fn consume(
    worker: &Arc<Worker>,
    broker: &Broker,
    hand: &mut Hand,
    shutdown: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let publisher = Arc::new(broker.publisher().await?);
    // A job is taken only when there is room for it, and acked once its lease is held: the
    // broker holds no delivery for this consumer longer than that.
    let (channel, deliveries) = broker.take_jobs().await?;
    let (dead_channel, dead_letters) = broker.consume_dead_letters(&worker.name).await?;
    worker.set_publisher(Some(publisher.clone()));
    tracing::info!(consumer = %worker.name, "consuming jobs");
    worker.metrics.consuming.set(1);
    // The session lasts while every channel it uses does. One closed from the broker's side (a
    // broker restarting, a channel error) ends it: no job is taken any more, the connection is
    // closed and the consumer connects and consumes again, while the jobs in hand go on.
    // Waiting on the other channels alone would leave a consumer alive that consumes nothing.
    let session = shutdown.child_token();
    let lost: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let end_session = |why: String| {
        worker.metrics.consuming.set(0);
        let mut lost = lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() && !shutdown.is_cancelled() {
            tracing::warn!(consumer = %worker.name, %why, "a channel to the broker was lost; consuming again on a new connection");
            worker.metrics.channels_lost.inc();
            *lost = Some(why);
        }
        session.cancel();
    };
    // Jobs whose lease lapsed (their consumer died) are published again by whichever
    // consumer sweeps first.
    let sweeper = async {
        loop {
            tokio::time::sleep(worker.leases.interval()).await;
            worker.leases.sweep(&publisher, &worker.metrics).await;
        }
    };
    let watchdog = async {
        loop {
            tokio::time::sleep(CHANNEL_CHECK).await;
            let open = [
                ("the jobs", channel.status().connected()),
                ("the dead letters'", dead_channel.status().connected()),
                ("the publishing", publisher.is_open()),
            ];
            if let Some((which, _)) = open.iter().find(|(_, open)| !open) {
                end_session(format!("{which} channel was closed"));
                break;
            }
        }
        // Done: the session is over.
        std::future::pending::<()>().await
    };
    let taking = async {
        let mut deliveries = std::pin::pin!(deliveries);
        // What this consumer last said in the fleet table: a free slot and nothing to take
        // (not said yet in this session; a session lost while idle may have left it said).
        worker.say_idle(false).await;
        let mut idle = false;
        'taking: loop {
            hand.reap();
            // While jobs in hand wait for a slot, the queue is looked at now and then: each
            // gives way when another consumer is idle and the queue runs low
            // (`Worker::give_way`).
            let room = loop {
                tokio::select! {
                    room = hand.room.clone().acquire_owned() => {
                        break room.expect("the room is never closed")
                    }
                    () = tokio::time::sleep(AHEAD_RECHECK) => {
                        if hand.tasks.len() > usize::from(worker.concurrency) {
                            worker.look_at_queue(broker).await
                        }
                    }
                    () = session.cancelled() => break 'taking,
                }
            };
            // With as many jobs in hand as slots, the next one would be prepared and then wait:
            // taken only while the queue holds enough for the rest of the fleet's slots too.
            while hand.tasks.len() >= usize::from(worker.concurrency) && !worker.may_take_ahead() {
                tokio::select! {
                    Some(ended) = hand.tasks.join_next() => Hand::forget(ended),
                    () = tokio::time::sleep(AHEAD_RECHECK) => worker.look_at_queue(broker).await,
                    () = session.cancelled() => break 'taking,
                }
            }
            // A free slot and no job for it a moment later: said in the fleet table, so that a
            // job waiting for another consumer's busy slot comes here. The same `next` is
            // polled throughout: a `basic.get` under way is never dropped.
            let free = hand.tasks.len() < usize::from(worker.concurrency);
            let mut next = deliveries.next();
            let delivery = loop {
                tokio::select! {
                    delivery = &mut next => break delivery,
                    () = tokio::time::sleep(IDLE_AFTER), if free && !idle => {
                        worker.say_idle(true).await;
                        idle = true;
                    }
                    () = session.cancelled() => break 'taking,
                }
            };
            if idle && matches!(delivery, Some(Ok(_))) {
                worker.say_idle(false).await;
                idle = false;
            }
            match delivery {
                Some(Ok((delivery, left))) => {
                    worker.saw_queue(left);
                    let worker = worker.clone();
                    hand.tasks.spawn(async move {
                        worker.handle(delivery).await;
                        drop(room);
                    });
                }
                Some(Err(err)) => {
                    end_session(format!("the jobs channel failed: {err}"));
                    break;
                }
                None => {
                    end_session("the jobs channel ended".to_owned());
                    break;
                }
            }
        }
    };
    let dead_letters = dead_letters
        .take_until(session.clone().cancelled_owned())
        .for_each(|delivery| {
            let worker = worker.clone();
            let delivery = delivery.map_err(|err| {
                end_session(format!("the dead letters' channel failed: {err}"));
            });
            async move {
                if let Ok(delivery) = delivery {
                    worker.handle_dead_letter(delivery).await;
                }
            }
        });
    // The dead letters' stream ending (its channel gone) ends the session too.
    let dead_letters = async {
        dead_letters.await;
        end_session("the broker ended the dead letters' delivery stream".to_owned());
    };
    tokio::select! {
        ((), ()) = futures::future::join(taking, dead_letters) => {}
        // Never ends: it cancels the session, which ends the others.
        () = watchdog => {}
        // Never ends.
        () = sweeper => {}
    }
    worker.metrics.consuming.set(0);
    if shutdown.is_cancelled() {
        // The jobs still waiting for a slot hand themselves back at once; the running ones
        // have the grace period, publishing through this session meanwhile.
        let finished = tokio::time::timeout(grace, async {
            tokio::select! {
                () = hand.finish() => {}
                // Never ends.
                () = async {
                    loop {
                        tokio::time::sleep(worker.leases.interval()).await;
                        worker.leases.sweep(&publisher, &worker.metrics).await;
                    }
                } => {}
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                ?grace,
                "jobs still running after the grace period are given back to the queue"
            );
            hand.tasks.abort_all();
            hand.finish().await;
            worker.leases.lapse_all().await;
            worker.leases.sweep(&publisher, &worker.metrics).await;
        }
    }
    worker.set_publisher(None);
    // Closed one after the other before the connection is (rather than left to their drop,
    // which closes them as the connection goes and makes the client log an error).
    for channel in [dead_channel, channel] {
        channel.close(200, "consumer stopping".into()).await.ok();
    }
    publisher.close().await;
    let lost = lost.lock().unwrap_or_else(|p| p.into_inner()).take();
    match lost {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// How often a consumer checks that its channels to the broker are still open.
const CHANNEL_CHECK: Duration = Duration::from_secs(1);

/// Connects to the broker again, waiting longer after each failure (1 s up to 30 s), until it
/// works or `shutdown` is cancelled (`None`).
pub(crate) async fn reconnect(config: &Config, shutdown: &CancellationToken) -> Option<Broker> {
    use backon::BackoffBuilder as _;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return None,
        }
        match Broker::connect(&config.rabbitmq).await {
            Ok(broker) => {
                tracing::info!("reconnected to the broker");
                return Some(broker);
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), ?delay, "cannot reach the broker yet")
            }
        }
    }
}

impl Worker {
    /// The current session's publisher.
    pub(crate) fn publisher(&self) -> anyhow::Result<Arc<Publisher>> {
        self.publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .context("no connection to the broker at the moment")
    }

    pub(crate) fn set_publisher(&self, publisher: Option<Arc<Publisher>>) {
        *self.publisher.lock().unwrap_or_else(|p| p.into_inner()) = publisher;
    }

    async fn handle(&self, delivery: Delivery) {
        self.metrics.in_progress.inc();
        // The job's trace, continued from the context its producer put in the headers.
        let span = tracing::info_span!("run job", job = tracing::field::Empty);
        quarry_infra::telemetry::extract(delivery.properties.headers().as_ref(), &span);
        async {
            match self.take(&delivery).await {
                Ok(None) => {}
                Ok(Some(taken)) => {
                    let _in_hand = self.take_in_hand(taken.job.id);
                    if let Err(err) = self.process(&taken).await {
                        // The result could not be recorded (database down?): let another
                        // attempt do it.
                        tracing::error!(error = %format!("{err:#}"), "job not processed; handing it back to the queue");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Err(err) = self.hand_back(&taken.lease).await {
                            tracing::error!(error = %format!("{err:#}"), "cannot hand the job back; its lease lapses and it is published again");
                        }
                    }
                }
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "job not taken; returning it to the queue");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Err(err) = give_back(&delivery).await {
                        tracing::error!(error = %format!("{err:#}"), "cannot return the delivery; the broker will redeliver it");
                    }
                }
            }
        }
        .instrument(span)
        .await;
        self.metrics.in_progress.dec();
    }

    /// Takes a delivered job on: holds its lease, then acks the delivery. `None` when there is
    /// nothing to do (an invalid message or a job of no run, dead-lettered; a job that has its
    /// result; a copy of a job another consumer holds), the delivery acked.
    async fn take(&self, delivery: &Delivery) -> anyhow::Result<Option<Taken>> {
        let publisher = self.publisher()?;
        let job = match Job::from_message(&delivery.data) {
            Ok(job) => job,
            Err(invalid) => {
                tracing::warn!(reason = %invalid, "dead-lettering an invalid message");
                publisher.dead_letter(&delivery.data, &invalid.0).await?;
                self.metrics.dead_lettered.inc();
                ack(delivery).await?;
                return Ok(None);
            }
        };
        tracing::Span::current().record("job", tracing::field::display(job.id));
        let state = self.store.job_state(&job).await?;
        if state == JobState::Finished {
            tracing::info!(job = %job.id, package = %job.package, "already has a result; skipping");
            self.metrics.duplicates_skipped.inc();
            // Its first delivery may have died after recording a regression's re-run and
            // before publishing it.
            self.publish_unpublished_reruns(&publisher, &job).await?;
            ack(delivery).await?;
            return Ok(None);
        }
        if state == JobState::Unknown {
            let reason = format!(
                "job {} is not recorded in the database (run deleted?)",
                job.id
            );
            publisher.dead_letter(&delivery.data, &reason).await?;
            self.metrics.dead_lettered.inc();
            ack(delivery).await?;
            return Ok(None);
        }
        let failed_attempts = queue::failed_attempts(&delivery.properties);
        let Some(lease) = self
            .leases
            .take(&job, &delivery.data, failed_attempts)
            .await?
        else {
            tracing::info!(job = %job.id, package = %job.package, "another consumer holds this job; dropping the copy");
            self.metrics.duplicates_skipped.inc();
            ack(delivery).await?;
            return Ok(None);
        };
        // The lease holds the job from now on. A failed ack only means the broker delivers
        // the message again: that copy finds the lease and is dropped.
        if let Err(err) = ack(delivery).await {
            tracing::warn!(job = %job.id, error = %format!("{err:#}"), "cannot ack a job taken on; its copy will be dropped");
        }
        Ok(Some(Taken { job, state, lease }))
    }

    /// Hands a job back to the work queue as it came (no attempt counted against it), for this
    /// or another consumer to take again.
    pub(crate) async fn hand_back(&self, lease: &Lease) -> anyhow::Result<()> {
        let publisher = self.publisher()?;
        let put_back = publisher.put_back(&lease.message, lease.failed_attempts);
        self.leases.hand_over(lease, put_back).await
    }

    /// A copy of a dead letter: recorded if the broker made it, then acked. A failure to record
    /// it gives it back, to be tried again.
    async fn handle_dead_letter(&self, delivery: Delivery) {
        let handled = match self.record_broker_dead_letter(&delivery).await {
            Ok(()) => ack(&delivery).await,
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "cannot record a dead letter; returning it");
                tokio::time::sleep(Duration::from_secs(1)).await;
                give_back(&delivery).await
            }
        };
        if let Err(err) = handled {
            tracing::error!(error = %format!("{err:#}"), "cannot settle a dead letter; the broker will deliver it again");
        }
    }

    /// Records the job of a message the broker dead-lettered itself (past the work queue's
    /// delivery limit, so no consumer got to record it) as an `error`, dead-lettered with the
    /// broker's reason. The consumers' own dead letters carry their reason and were recorded
    /// by them; those, and messages that are not jobs, need nothing.
    async fn record_broker_dead_letter(&self, delivery: &Delivery) -> anyhow::Result<()> {
        if queue::dead_letter_reason(&delivery.properties).is_some() {
            return Ok(());
        }
        let Some((why, _)) = queue::broker_death(&delivery.properties) else {
            return Ok(());
        };
        let Ok(job) = Job::from_message(&delivery.data) else {
            return Ok(());
        };
        if matches!(
            self.store.job_state(&job).await?,
            JobState::Finished | JobState::Unknown
        ) {
            return Ok(());
        }
        let reason = format!(
            "dead-lettered by the broker ({why}, after {} deliveries): each ended with its \
             consumer dying or giving it back (PostgreSQL unreachable, or a job that crashes \
             consumers?)",
            queue::previous_deliveries(&delivery.properties)
        );
        tracing::error!(job = %job.id, package = %job.package, %reason, "recording a job the broker gave up on");
        let attempt = queue::failed_attempts(&delivery.properties) + 1;
        self.record_verdict(&job, attempt, Outcome::Error, &reason, true, None)
            .await?;
        self.metrics.broker_dead_letters.inc();
        Ok(())
    }
}

/// Returns a delivery to the queue, for this or another consumer to take again.
async fn give_back(delivery: &Delivery) -> anyhow::Result<()> {
    delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .context("cannot give the delivery back")?;
    Ok(())
}

async fn ack(delivery: &Delivery) -> anyhow::Result<()> {
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .context("cannot ack the delivery")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::may_take_ahead;

    #[test]
    fn a_job_is_taken_ahead_only_while_the_queue_holds_work_for_the_other_slots() {
        // Alone, one slot: any job left in the queue is this consumer's to prepare.
        assert!(may_take_ahead(Some(1), 1, 1));
        assert!(!may_take_ahead(Some(0), 1, 1));
        // Two consumers of one slot: the last job in the queue is left to the other one,
        // which may be idle; with two left, each gets one.
        assert!(!may_take_ahead(Some(1), 2, 1));
        assert!(may_take_ahead(Some(2), 2, 1));
        // A fleet of 336 consumers of two slots: ahead only while every other slot has one.
        assert!(!may_take_ahead(Some(670), 672, 2));
        assert!(may_take_ahead(Some(671), 672, 2));
        // Nothing known of the queue yet.
        assert!(may_take_ahead(None, 672, 2));
    }
}
